"""Bad training inputs, table-driven: every row is something a user can send (a config value, an override, a YAML
file, a manifest, a resume target, an output path) and must end in one :class:`AF3Error` subclass with a message
naming the key or the ``file:line`` — never another exception. A few rows also go through ``af3 train`` in a
subprocess: exit code 2, one line on stderr, no traceback."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from af3.errors import AF3Error, CheckpointError, InputError
from af3.training.config import load_config
from af3.training.errors import TrainingError
from af3.training.trainer import train
from train_helpers import base_config, make_config, subprocess_env, write_config, write_manifest

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


class Ctx:
    """Paths and helpers shared by the rows: the tiny checkpoint, a good manifest, a finished run with
    checkpoints, and a fresh folder per call."""

    def __init__(self, root, ckpt: str, manifest: str, run: str):
        self.root, self.ckpt, self.manifest, self.run = str(root), ckpt, manifest, run
        self.n = 0

    def fresh(self, name: str = "x") -> str:
        self.n += 1
        return os.path.join(self.root, f"{name}{self.n}")

    def cfg(self, manifest: str | None = None, output: str | None = None, **sections) -> dict:
        cfg = base_config(self.ckpt, manifest or self.manifest, output or self.fresh("out"), **sections)
        cfg["train"]["max_steps"] = sections.get("train", {}).get("max_steps", 1)
        return cfg

    def train(self, manifest: str | None = None, output: str | None = None, **sections):
        return train(make_config(self.cfg(manifest, output, **sections)))

    def yaml(self, overrides: list[str] = (), text: str | bytes | None = None, **sections):
        path = self.fresh("cfg") + ".yaml"
        if text is None:
            write_config(path, self.cfg(**sections))
        else:
            with open(path, "wb") as f:
                f.write(text.encode() if isinstance(text, str) else text)
        return load_config(path, list(overrides))

    def lines(self, *lines: str | dict, name: str = "m.jsonl", raw: bytes | None = None) -> str:
        folder = self.fresh("manifest")
        os.makedirs(folder)
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(raw if raw is not None else
                    "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode())
        return path

    def file(self) -> str:
        path = self.fresh("file")
        with open(path, "w") as f:
            f.write("not a folder")
        return path

    def checkpoint(self, damage=None) -> str:
        """A copy of the finished run's first checkpoint, damaged by ``damage(folder)``."""
        path = self.fresh("ckpt")
        shutil.copytree(os.path.join(self.run, "checkpoint-000001"), path)
        if damage is not None:
            damage(path)
        return path


def _truncate(name: str, size: int = 100):
    def damage(folder: str) -> None:
        with open(os.path.join(folder, name), "r+b") as f:
            f.truncate(size)
    return damage


def _remove(name: str):
    return lambda folder: os.remove(os.path.join(folder, name))


def _state(change):
    def damage(folder: str) -> None:
        path = os.path.join(folder, "trainer_state.pt")
        torch.save(change(torch.load(path, weights_only=True)), path)
    return damage


def _nan_weights(c: Ctx) -> str:
    """A copy of the tiny checkpoint whose final norm is NaN: the first loss is NaN."""
    from safetensors.torch import load_file, save_file

    folder = c.fresh("nanckpt")
    shutil.copytree(c.ckpt, folder)
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["language_model.model.norm.weight"].fill_(float("nan"))
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def _in_use(c: Ctx):
    import fcntl

    out = c.fresh("busy")
    os.makedirs(out)
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        c.train(output=out)
    finally:
        os.close(fd)


def _finished_without_checkpoints(c: Ctx):
    out = c.fresh("done")
    c.train(output=out)
    c.train(output=out, train={"resume": True})


# ------------------------------------------------------------------------------------------ the table
# (id, call(ctx), exception class, regex the message must match)

CONFIG_ROWS = [(f"override {o}", (lambda c, o=o: c.yaml([o])), cls, rx) for o, cls, rx in [
    ("optim.lr=.inf", InputError, r"'optim\.lr'"),
    ("optim.lr=.nan", InputError, r"'optim\.lr'"),
    ("optim.lr=-1e-3", InputError, r"'optim\.lr'.*> 0"),
    ("optim.lr=5", InputError, r"'optim\.lr'.*at most 1"),
    ("optim.lr=fast", InputError, r"'optim\.lr'.*expected"),
    ("optim.lr=true", InputError, r"'optim\.lr'"),
    ("optim.betas=[0.9]", InputError, r"'optim\.betas'"),
    ("optim.betas=[0.9, 1.0]", InputError, r"'optim\.betas'"),
    ("optim.betas=[0.9, .nan]", InputError, r"'optim\.betas'"),
    ("optim.betas=0.9", InputError, r"'optim\.betas'.*list"),
    ("optim.eps=0", InputError, r"'optim\.eps'"),
    ("optim.eps=.inf", InputError, r"'optim\.eps'"),
    ("optim.weight_decay=-0.1", InputError, r"'optim\.weight_decay'"),
    ("optim.weight_decay=.inf", InputError, r"'optim\.weight_decay'"),
    ("optim.warmup_steps=-1", InputError, r"'optim\.warmup_steps'"),
    ("optim.warmup_ratio=1.5", InputError, r"'optim\.warmup_ratio'"),
    ("optim.min_lr_ratio=.nan", InputError, r"'optim\.min_lr_ratio'"),
    ("optim.max_grad_norm=.inf", InputError, r"'optim\.max_grad_norm'"),
    ("optim.max_grad_norm=-1", InputError, r"'optim\.max_grad_norm'"),
    ("optim.part_lr={audio_tower: .inf}", InputError, r"'optim\.part_lr'"),
    ("optim.schedule=exponential", InputError, r"'optim\.schedule'"),
    ("train.batch_size=0", InputError, r"'train\.batch_size'"),
    ("train.batch_size=1.5", InputError, r"'train\.batch_size'.*integer"),
    ("train.batch_size=true", InputError, r"'train\.batch_size'.*integer"),
    ("train.batch_size=two", InputError, r"'train\.batch_size'.*integer"),
    ("train.grad_accum=0", InputError, r"'train\.grad_accum'"),
    ("train.max_steps=-3", InputError, r"'train\.max_steps'"),
    ("train.epochs=.inf", InputError, r"'train\.epochs'"),
    ("train.save_every=-1", InputError, r"'train\.save_every'"),
    ("train.eval_every=-1", InputError, r"'train\.eval_every'"),
    ("train.keep_last=0", InputError, r"'train\.keep_last'"),
    ("train.log_every=0", InputError, r"'train\.log_every'"),
    ("train.seed=-1", InputError, r"'train\.seed'"),
    ("train.seed=1e30", InputError, r"'train\.seed'"),
    ("train.device=tpu", InputError, r"'train\.device'"),
    ("train.bf16=maybe", InputError, r"'train\.bf16'"),
    ("train.strategy=zero3", InputError, r"'train\.strategy'"),
    ("train.gradient_checkpointing=sometimes", InputError, r"'train\.gradient_checkpointing'"),
    ("data.num_workers=-1", InputError, r"'data\.num_workers'"),
    ("data.num_workers=100000", InputError, r"'data\.num_workers'"),
    ("data.max_audio_len=10", InputError, r"'data\.max_audio_len'"),
    ("data.max_audio_len=1e9", InputError, r"'data\.max_audio_len'"),
    ("data.max_skipped=-1", InputError, r"'data\.max_skipped'"),
    ("data.group_size=0", InputError, r"'data\.group_size'"),
    ("data.eval_batch_size=0", InputError, r"'data\.eval_batch_size'"),
    ("data.mixture=-1*train.jsonl", InputError, r"'data\.mixture'.*positive number"),
    ("data.mixture=0*train.jsonl", InputError, r"'data\.mixture'.*positive number"),
    ("data.mixture=nan*train.jsonl", InputError, r"'data\.mixture'.*positive number"),
    ("data.mixture=two*train.jsonl", InputError, r"'data\.mixture'.*WEIGHT\*NAME"),
    ("data.mixture={train.jsonl: .nan}", InputError, r"'data\.mixture'.*positive number"),
    ("data.mixture={train.jsonl: '2'}", InputError, r"'data\.mixture'.*positive number"),
    ("data.mixture=[]", InputError, r"'data\.mixture'.*empty"),
    ("data.mixture=", InputError, r"'data\.mixture'"),
    ("data.mixture=a.jsonl++b.jsonl", InputError, r"'data\.mixture'.*empty term"),
    ("data.mixture=5", InputError, r"'data\.mixture'.*not a int"),
    ("data.manifests=[a.jsonl]", InputError, r"'data\.manifests'"),
    ("stage=stage9", InputError, r"unknown stage 'stage9'"),
    ("model.dtype=float8", InputError, r"'model\.dtype'"),
    ("model.path=", InputError, r"'model\.path'"),
    ("output=", InputError, r"'output'"),
    ("lora.r=0", InputError, r"'lora\.r'"),
    ("lora.alpha=-1", InputError, r"'lora\.alpha'"),
    ("lora.dropout=1.0", InputError, r"'lora\.dropout'"),
    ("lora.dropout=-0.1", InputError, r"'lora\.dropout'"),
    ("lora.target_modules='('", InputError, r"'lora\.target_modules'.*regex"),
    ("lora.target_modules=[]", InputError, r"'lora\.target_modules'"),
    ("optim.nonsense=1", InputError, r"unknown config key 'optim\.nonsense'"),
    ("bogus.key=1", InputError, r"unknown config key 'bogus\.key'"),
    ("optim.lr", InputError, r"KEY=VALUE"),
    ("train=5", InputError, r"train must be a mapping"),
]]

YAML_ROWS = [
    ("epochs 0 without max_steps", lambda c: c.yaml(["train.max_steps=null", "train.epochs=0"]), InputError,
     r"'train\.epochs'"),
    ("yaml is a list", lambda c: c.yaml(text="- model\n- data\n"), InputError, r"mapping of sections.*not a list"),
    ("yaml is a number", lambda c: c.yaml(text="42\n"), InputError, r"mapping of sections.*not a int"),
    ("yaml is broken", lambda c: c.yaml(text="model: [\n  path: x\n"), InputError, r"\.yaml:\d+: not valid YAML"),
    ("yaml python tag", lambda c: c.yaml(text="model: !!python/object/apply:os.system [echo]\n"), InputError,
     r"not valid YAML"),
    ("yaml not utf-8", lambda c: c.yaml(text=b"model:\n  path: \xff\xfe\n"), InputError, r"not UTF-8"),
    ("yaml section not a mapping", lambda c: c.yaml(text="model: {path: x}\ndata: 5\n"), InputError,
     r"data must be a mapping"),
    ("yaml unknown key", lambda c: c.yaml(text="model: {path: x}\ndata: {mixture: a.jsonl, wat: 1}\n"), InputError,
     r"unknown config key 'data\.wat'"),
    ("yaml missing", lambda c: load_config(c.fresh("nope") + ".yaml"), InputError, r"does not exist"),
    ("yaml is a folder", lambda c: load_config(c.root), InputError, r"is a folder"),
]

TRAIN_ROWS = [
    ("output is a file", lambda c: c.train(output=c.file()), InputError, r"'output'.*is a file"),
    ("output under a file", lambda c: c.train(output=os.path.join(c.file(), "out")), InputError,
     r"'output'.*is a file, so"),
    ("output in use", _in_use, TrainingError, r"in use by another training run"),
    ("output holds a run", lambda c: c.train(output=c.run), TrainingError, r"already holds a run.*--resume"),
    ("resume a finished run without checkpoints", _finished_without_checkpoints, TrainingError,
     r"finished run \(final/\) but no checkpoint"),
    ("model.path is a file", lambda c: c.train(model={"path": c.file()}), InputError, r"'model\.path'.*is a file"),
    ("model.path missing", lambda c: c.train(model={"path": c.fresh("none")}), InputError,
     r"'model\.path'.*does not exist"),
    ("model.path not a checkpoint", lambda c: c.train(model={"path": c.root}), InputError,
     r"'model\.path'.*no config\.json"),
    # The loader rejects it (CheckpointError); were it to load, the first loss is NaN (TrainingError).
    ("model with NaN weights", lambda c: c.train(model={"path": _nan_weights(c)}), AF3Error, r"(?i)\bnan\b"),
    ("mixture file missing", lambda c: c.train(manifest=c.fresh("gone") + ".jsonl"), InputError,
     r"'data\.mixture'.*unknown dataset.*not a manifest file"),
    ("mixture is a folder", lambda c: c.train(manifest=c.root), InputError, r"'data\.mixture'.*a folder"),
    ("mixture unknown name", lambda c: c.train(data={"mixture": "2*asr"}), InputError,
     r"'data\.mixture'.*unknown dataset 'asr'"),
    ("eval missing", lambda c: c.train(data={"eval": c.fresh("dev") + ".jsonl"}), InputError,
     r"'data\.eval'.*does not exist"),
    ("manifest bad JSON", lambda c: c.train(manifest=c.lines(GOOD, '{"messages": [')), InputError,
     r"m\.jsonl:2: bad JSON"),
    ("manifest row not an object", lambda c: c.train(manifest=c.lines(GOOD, GOOD, "5")), InputError,
     r"m\.jsonl:3: expected"),
    ("manifest unknown role", lambda c: c.train(manifest=c.lines(
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]})), InputError,
     r"m\.jsonl:1: message 1 has unknown role 'robot'"),
    ("manifest empty messages", lambda c: c.train(manifest=c.lines(GOOD, {"messages": []})), InputError,
     r"m\.jsonl:2: \"messages\" must be a non-empty list"),
    ("manifest no assistant reply", lambda c: c.train(manifest=c.lines(
        {"messages": [{"role": "user", "content": "x"}]})), InputError, r"m\.jsonl:1: .*assistant reply is missing"),
    ("manifest audio in a reply", lambda c: c.train(manifest=c.lines({"messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "audio", "path": "a.wav"}]}]})),
     InputError, r"m\.jsonl:1: message 2: audio in a assistant message"),
    ("manifest bad duration", lambda c: c.train(manifest=c.lines({**GOOD, "duration": -3})), InputError,
     r"m\.jsonl:1: \"duration\""),
    ("manifest empty", lambda c: c.train(manifest=c.lines(raw=b"\n\n")), InputError, r"holds no examples"),
    ("manifest not utf-8", lambda c: c.train(manifest=c.lines(raw=b'{"messages": "\xff"}\n')), InputError,
     r"not UTF-8"),
    ("nvidia empty conversations", lambda c: c.train(manifest=c.lines(raw=b'[\n{"sound": "a.wav", '
                                                                         b'"conversations": []}\n]', name="m.json")),
     InputError, r"m\.json:2: \"conversations\" must be a non-empty list"),
    ("nvidia unknown speaker", lambda c: c.train(manifest=c.lines(raw=json.dumps([{"conversations": [
        {"from": "alien", "value": "x"}]}]).encode(), name="m.json")), InputError,
     r"m\.json:1: turn 1 has unknown \"from\" 'alien'"),
    ("all audio broken (an epoch)", lambda c: c.train(manifest=write_manifest(c.fresh("broken"), 4,
                                                                              broken=(0, 1, 2, 3)),
                                                      train={"max_steps": 2}),
     TrainingError, r"epoch 1 of data\.mixture had no supervised token"),
    ("all audio missing (part of an epoch)", lambda c: c.train(manifest=write_manifest(c.fresh("missing"), 4,
                                                                                       missing=(0, 1, 2, 3))),
     TrainingError, r"the run trained on no supervised token in 1 step"),
    ("lora.r above the layers", lambda c: c.train(stage="stage3.5", lora={"r": 100000}), InputError,
     r"lora\.r=100000 is larger than the smallest layer"),
    ("resume missing", lambda c: c.train(train={"resume": c.fresh("nockpt")}), TrainingError,
     r"not a complete checkpoint \(it does not exist\)"),
    ("resume a file", lambda c: c.train(train={"resume": c.file()}), TrainingError, r"not a complete checkpoint"),
    ("resume without trainer state", lambda c: c.train(train={"resume": c.checkpoint(_remove("trainer_state.pt"))}),
     TrainingError, r"not a complete checkpoint \(no trainer_state\.pt"),
    ("resume truncated trainer state", lambda c: c.train(train={"resume": c.checkpoint(
        _truncate("trainer_state.pt"))}), CheckpointError, r"cannot read .*trainer_state\.pt.*damaged"),
    ("resume trainer state of another kind", lambda c: c.train(train={"resume": c.checkpoint(
        _state(lambda s: [1, 2]))}), CheckpointError, r"unknown trainer state format"),
    ("resume trainer state without optimizer", lambda c: c.train(train={"resume": c.checkpoint(
        _state(lambda s: {k: v for k, v in s.items() if k != "optimizer"}))}), CheckpointError,
     r"lacks optimizer"),
    ("resume truncated weights", lambda c: c.train(train={"resume": c.checkpoint(
        _truncate("model.safetensors", 1000))}), CheckpointError, r"model\.safetensors.*not a valid safetensors"),
    ("resume without weights", lambda c: c.train(train={"resume": c.checkpoint(_remove("model.safetensors"))}),
     CheckpointError, r"no weights in"),
    ("resume with another lr", lambda c: c.train(optim={"lr": 2e-3}, train={"resume": c.checkpoint()}),
     TrainingError, r"trained with optim\.lr=0\.001, this run has optim\.lr=0\.002"),
    ("resume with another stage", lambda c: c.train(stage="stage2", train={"resume": c.checkpoint()}),
     TrainingError, r"written by stage stage3, this run is stage2"),
    ("resume with another dtype", lambda c: c.train(model={"path": c.ckpt, "dtype": "bfloat16"},
                                                    train={"resume": c.checkpoint()}),
     TrainingError, r"model\.dtype='float32', this run has model\.dtype='bfloat16'"),
]
if not torch.cuda.is_available():
    TRAIN_ROWS.append(("cuda on a machine without one", lambda c: c.train(train={"device": "cuda"}), InputError,
                       r"train\.device=cuda but this machine has no usable CUDA device"))

ROWS = CONFIG_ROWS + YAML_ROWS + TRAIN_ROWS


@pytest.fixture(scope="module")
def ctx(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    manifest = write_manifest(root / "data", 4)
    run = str(root / "run")
    train(make_config(base_config(tiny_ckpt[0], manifest, run, train={"max_steps": 2, "save_every": 1})))
    return Ctx(root, tiny_ckpt[0], manifest, run)


def test_the_table_is_large():
    assert len(ROWS) >= 40 and len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize(("call", "cls", "pattern"), [pytest.param(*r[1:], id=r[0]) for r in ROWS])
def test_bad_input_is_one_clear_af3_error(ctx, monkeypatch, call, cls, pattern):
    monkeypatch.chdir(os.path.dirname(ctx.manifest))  # relative manifest names in overrides resolve here
    with pytest.raises(Exception) as info:  # noqa: PT011 - the class is asserted below, exactly
        call(ctx)
    error = info.value
    assert isinstance(error, AF3Error) and isinstance(error, cls), f"{type(error).__name__}: {error}"
    assert "\n" not in str(error), str(error)
    assert re.search(pattern, str(error)), str(error)


def _numeric_keys() -> list[tuple[str, type]]:
    """Every int/float (or optional int/float) key of the schema."""
    import dataclasses
    import typing

    from af3.training.sections import TrainConfig

    out = []
    for section, tp in typing.get_type_hints(TrainConfig).items():
        if not dataclasses.is_dataclass(tp):
            continue
        for name, field_tp in typing.get_type_hints(tp).items():
            kinds = set(typing.get_args(field_tp)) - {type(None)} or {field_tp}
            if kinds in ({int}, {float}):
                out.append((f"{section}.{name}", kinds.pop()))
    return out


NUMERIC = _numeric_keys()


def test_the_numeric_sweep_covers_the_schema():
    assert len(NUMERIC) >= 25 and ("optim.lr", float) in NUMERIC and ("train.batch_size", int) in NUMERIC


@pytest.mark.parametrize(("key", "value"), [
    pytest.param(key, value, id=f"{key}={value}")
    for key, kind in NUMERIC for value in ("abc", "true", "[1]", "{a: 1}", ".nan", ".inf", "-.inf")
    + (("1.5",) if kind is int else ())])
def test_every_numeric_key_refuses_a_wrong_type_or_a_nonfinite_value(ctx, key, value):
    with pytest.raises(InputError, match=re.escape(repr(key))):
        ctx.yaml([f"{key}={value}"])


def test_resume_flag_without_a_path(ctx):
    from af3.training.trainer import run

    with pytest.raises(InputError, match=r"--resume= needs a checkpoint folder"):
        run(write_config(ctx.fresh("r") + ".yaml", ctx.cfg()), resume="")


def test_an_output_folder_that_cannot_be_written(ctx, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)  # as a read-only file system answers
    with pytest.raises(InputError, match=r"'output': cannot write to .*permission denied or a read-only"):
        ctx.train()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes everything")
def test_unreadable_yaml_and_unwritable_output_for_real(ctx):
    path = write_config(ctx.fresh("secret") + ".yaml", ctx.cfg())
    os.chmod(path, 0)
    with pytest.raises(InputError, match=r"cannot read training config"):
        load_config(path)
    locked = ctx.fresh("ro")
    os.makedirs(locked)
    os.chmod(locked, 0o500)
    try:
        with pytest.raises(InputError, match=r"'output': cannot write"):
            ctx.train(output=os.path.join(locked, "out"))
    finally:
        os.chmod(locked, 0o700)


# ------------------------------------------------------------------------------------------ the CLI

def _af3() -> str:
    return os.path.join(os.path.dirname(sys.executable), "af3")


def test_cli_reports_bad_inputs_in_one_line(ctx):
    c = ctx
    yaml_list = c.fresh("list") + ".yaml"
    with open(yaml_list, "w") as f:
        f.write("- a\n- b\n")
    good = write_config(c.fresh("good") + ".yaml", c.cfg())
    cases = [
        ([good, "optim.lr=.inf"], r"'optim\.lr'"),
        ([yaml_list], r"mapping of sections"),
        ([write_config(c.fresh("m") + ".yaml", c.cfg(model={"path": c.file()}))], r"'model\.path'.*is a file"),
        ([write_config(c.fresh("o") + ".yaml", c.cfg(output=c.file()))], r"'output'.*is a file"),
        ([good, f"data.mixture=-2*{c.manifest}"], r"'data\.mixture'.*positive number"),
        ([good, f"--resume={c.fresh('nockpt')}"], r"not a complete checkpoint"),
    ]

    def run(args):
        return subprocess.run([_af3(), "train", *args], capture_output=True, text=True, timeout=120,
                              env=subprocess_env(), check=False)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, [args for args, _ in cases]))
    for (args, pattern), proc in zip(cases, results, strict=True):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and re.search(pattern, lines[0]), (args, lines)
        assert proc.stdout == "", (args, proc.stdout)
