"""af3: Audio Flamingo 3 in plain PyTorch — run, chat with, serve, fine-tune and evaluate it."""

from __future__ import annotations

from .errors import AF3Error, AudioError, CheckpointError, InputError
from .processor import AF3Inputs, AF3Processor

__all__ = ["AF3Error", "AF3Inputs", "AF3Model", "AF3Processor", "AudioError", "CheckpointError", "InputError", "load"]
__version__ = "0.1.0"


def load(path, dtype=None, device="cpu", allow_pickle: bool = False):
    """Model and processor of one checkpoint folder: ``model, processor = af3.load(path)``."""
    from .model import AF3Model

    processor = AF3Processor.from_pretrained(path)
    model = AF3Model.from_pretrained(path, dtype=dtype, device=device, allow_pickle=allow_pickle)
    return model, processor


def __getattr__(name: str):
    # The model pulls in torch.nn modules; import it on first use so `import af3` stays light for the CLI.
    if name == "AF3Model":
        from .model import AF3Model

        return AF3Model
    raise AttributeError(f"module 'af3' has no attribute {name!r}")
