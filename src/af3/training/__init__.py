"""Fine-tuning AF3: ``af3 train CONFIG`` / ``python -m af3.training.trainer``.

Run settings: :mod:`.sections` (the YAML schema), :mod:`.config` (loading, overrides, checks), :mod:`.stages`
(the curriculum presets), :mod:`.lora` (peft adapters). Data: :mod:`.manifest` (manifest formats),
:mod:`.mixture` (mixture specs), :mod:`.data` (dataset, sampler, collator), :mod:`.loader` (batches per step). The
loop: :mod:`.trainer` (``Trainer``) with :mod:`.preflight` (input files, the output folder's lock),
:mod:`.distributed`, :mod:`.model_setup`, :mod:`.optim`, :mod:`.checkpoint`, :mod:`.metrics` and :mod:`.plot`.
:mod:`.synthetic` and :mod:`.tiny_recipe` make and train the embedded tiny model.
"""
