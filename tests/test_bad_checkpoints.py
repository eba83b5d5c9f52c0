"""Bad checkpoints, configs and arguments: each row breaks one thing of a tiny valid checkpoint and asserts that
loading (model, processor, ``af3.load``), saving or converting it raises exactly a :class:`CheckpointError` or an
:class:`InputError` — never another exception — with a one-line message that names the problem."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ckpt_corrupt as C
import pytest
import torch
from nvidia_layout import make_nvidia_layout

import af3
from af3 import AF3Model, AF3Processor
from af3.errors import AF3Error, CheckpointError, InputError

CK, IN = CheckpointError, InputError
PROC, PRE, TOK, CFG, GEN = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json",
                            "config.json", "generation_config.json")
INDEX = "model.safetensors.index.json"
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return C.make_tiny(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def nvidia(base, tmp_path_factory):
    return make_nvidia_layout(base, str(tmp_path_factory.mktemp("nv") / "nv"))


def _dup_key(folder):
    path = os.path.join(folder, C.WEIGHTS)
    header, data = C.read_header(path)
    text = json.dumps(header)[:-1] + f', "{C.Q0}": ' + json.dumps(header[C.Q0]) + "}"
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text.encode() + data)


def _offsets(name, shift=0, copy_of=None):
    def edit(h):
        h[name]["data_offsets"] = list(h[copy_of]["data_offsets"]) if copy_of else [o + shift for o in
                                                                                    h[name]["data_offsets"]]
    return edit


def _preprocessor_only(**fields):
    def corrupt(folder):
        proc = C.read(folder, PROC)
        fe = dict(proc.pop("feature_extractor"), **fields)
        C.write(folder, PROC, proc)
        C.write(folder, PRE, fe)
    return corrupt


def _with_state(fn):
    return C.tensors_edit(fn)


def _also_in_second(wm, shards):
    first = sorted(shards)[0]
    name = next(iter(shards[first]))
    shards[sorted(shards)[1]][name] = shards[first][name]


R = pytest.param
MODEL_ROWS = [
    # ---- config.json: types, ranges, consistency
    R(C.set_key(CFG, "text_config.num_hidden_layers", "four"), {}, CK,
      r"config\.json: text_config\.num_hidden_layers must be an integer from 1 to 1024, got 'four' \(a string\)",
      id="layers-string"),
    R(C.set_key(CFG, "text_config.num_hidden_layers", True), {}, CK, r"num_hidden_layers .*True \(a boolean\)",
      id="layers-bool"),
    R(C.set_key(CFG, "text_config.vocab_size", 1e12), {}, CK, r"text_config\.vocab_size must be an integer.*a number",
      id="vocab-float"),
    R(C.set_key(CFG, "text_config.vocab_size", 10**12), {}, CK, r"implies a model of [\d.]+ GB in float32 but there "
      r"are [\d.]+ GB", id="vocab-too-big-for-memory"),
    R(C.set_key(CFG, "text_config.hidden_size", -64), {}, CK, r"text_config\.hidden_size must be an integer from 1",
      id="hidden-negative"),
    R(C.set_key(CFG, "text_config.num_attention_heads", 0), {}, CK, r"text_config\.num_attention_heads must be",
      id="heads-zero"),
    R(C.chain(C.set_key(CFG, "text_config.num_attention_heads", 6), C.set_key(CFG, "text_config.head_dim", None)), {},
      CK,
      r"num_attention_heads \(6\) must divide hidden_size \(64\)", id="heads-not-dividing"),
    R(C.set_key(CFG, "text_config.num_key_value_heads", 3), {}, CK, r"multiple of num_key_value_heads \(3\)",
      id="kv-heads-not-dividing"),
    R(C.set_key(CFG, "text_config.head_dim", 8), {}, CK, r"head_dim \(8\) x num_attention_heads \(4\) = 32 must "
      r"equal hidden_size \(64\)", id="head-dim-mismatch"),
    R(C.set_key(CFG, "text_config.rope_parameters.rope_theta", -1), {}, CK,
      r"rope_parameters\.rope_theta must be a finite number > 0", id="rope-theta-negative"),
    R(C.set_key(CFG, "text_config.rope_theta", 0), {}, CK, r"text_config\.rope_theta must be a finite number > 0",
      id="rope-theta-zero"),
    R(C.set_key(CFG, "text_config.rope_parameters.rope_type", "yarn"), {}, CK, r"rope_type must be one of 'default', "
      r"'linear'", id="rope-type-unsupported"),
    R(C.set_key(CFG, "text_config.rms_norm_eps", 0), {}, CK, r"rms_norm_eps must be a finite number > 0",
      id="eps-zero"),
    R(C.set_key(CFG, "text_config.hidden_act", "gelu"), {}, CK, r"hidden_act must be one of 'silu'",
      id="text-act-unsupported"),
    R(C.set_key(CFG, "text_config.use_sliding_window", True), {}, CK, r"sliding-window attention is not supported",
      id="sliding-window"),
    R(C.set_key(CFG, "text_config.tie_word_embeddings", 1), {}, CK, r"tie_word_embeddings must be true or false",
      id="tie-int"),
    R(C.set_key(CFG, "text_config.max_position_embeddings", 10**12), {}, CK, r"max_position_embeddings must be",
      id="positions-huge"),
    R(C.set_key(CFG, "text_config.eos_token_id", 99999), {}, CK, r"text_config\.eos_token_id 99999 is outside the "
      r"vocabulary", id="eos-outside-vocab"),
    R(C.set_key(CFG, "text_config.pad_token_id", -1), {}, CK, r"pad_token_id must be a token id", id="pad-negative"),
    R(C.set_key(CFG, "audio_token_id", 10**6), {}, CK, r"config\.json: audio_token_id 1000000 is outside the "
      r"vocabulary", id="audio-token-outside-vocab"),
    R(C.set_key(CFG, "audio_token_id", "3"), {}, CK, r"audio_token_id must be an integer", id="audio-token-string"),
    R(C.set_key(CFG, "projector_bias", "yes"), {}, CK, r"projector_bias must be true or false", id="bias-string"),
    R(C.set_key(CFG, "projector_hidden_act", "relu"), {}, CK, r"projector_hidden_act must be one of 'gelu'",
      id="projector-act"),
    R(C.set_key(CFG, "audio_config.num_attention_heads", 5), {}, CK, r"audio_config\.num_attention_heads \(5\) must "
      r"divide hidden_size \(64\)", id="audio-heads"),
    R(C.set_key(CFG, "audio_config.num_mel_bins", 12.5), {}, CK, r"audio_config\.num_mel_bins must be an integer",
      id="mel-bins-float"),
    R(C.set_key(CFG, "audio_config.activation_function", "relu"), {}, CK, r"activation_function must be one of",
      id="audio-act"),
    R(C.set_key(CFG, "text_config", [1, 2]), {}, CK, r"text_config must be an object", id="text-config-list"),
    R(C.set_key(CFG, "model_type", "qwen2"), {}, CK, r"model_type is 'qwen2'.*not 'audioflamingo3'",
      id="not-af3"),
    R(C.raw(CFG, "{not json"), {}, CK, r"config\.json' is not valid JSON", id="config-not-json"),
    R(C.raw(CFG, "[1, 2]"), {}, CK, r"config\.json' must hold a JSON object", id="config-list"),
    R(C.raw(CFG, b"\xff\xfe\x00garbage"), {}, CK, r"not valid JSON: it is not UTF-8", id="config-binary"),
    R(C.raw(CFG, "[" * 100_000), {}, CK, r"nested too deeply", id="config-deep-nesting"),
    R(C.raw(CFG, '{"audio_token_id": 3, "audio_token_id": 4}'), {}, CK, r"key 'audio_token_id' appears twice",
      id="config-duplicate-key"),
    R(C.remove(CFG), {}, CK, r"has no config\.json: it is not an AF3 checkpoint folder", id="config-missing"),
    R(C.chain(C.remove(CFG), lambda f: os.mkfifo(os.path.join(f, CFG))), {}, CK, r"config\.json' is not a regular "
      r"file", id="config-fifo"),
    R(C.chain(C.remove(CFG), lambda f: os.mkdir(os.path.join(f, CFG))), {}, CK, r"config\.json' is a folder",
      id="config-folder"),
    # ---- generation_config.json
    R(C.set_key(GEN, "max_new_tokens", "10"), {}, CK, r"generation_config\.json: max_new_tokens must be an integer",
      id="gen-max-new-string"),
    R(C.set_key(GEN, "eos_token_id", [2, 10**6]), {}, CK, r"generation_config\.json: eos_token_id 1000000 is outside",
      id="gen-eos-outside"),
    R(C.set_key(GEN, "temperature", -1), {}, CK, r"temperature must be a finite number >= 0", id="gen-temperature"),
    R(C.set_key(GEN, "top_p", 0), {}, CK, r"top_p must be a finite number > 0 and <= 1", id="gen-top-p"),
    R(C.set_key(GEN, "do_sample", "false"), {}, CK, r"do_sample must be true or false", id="gen-do-sample"),
    R(C.raw(GEN, "nope"), {}, CK, r"generation_config\.json' is not valid JSON", id="gen-not-json"),
    # ---- safetensors headers
    R(C.header_edit(lambda h: h[C.Q0].__setitem__("data_offsets", [5])), {}, CK,
      rf"tensor {C.Q0} has data_offsets \[5\]", id="offsets-one-int"),
    R(C.header_edit(lambda h: h[C.Q0].__setitem__("data_offsets", ["0", "4"])), {}, CK, r"data_offsets",
      id="offsets-strings"),
    R(C.header_edit(_offsets(C.Q0, shift=10**9)), {}, CK, rf"is truncated: tensor {C.Q0} needs bytes up to",
      id="offsets-past-end"),
    R(C.header_edit(_offsets(C.Q1, copy_of=C.Q0)), {}, CK, r"tensors .*q_proj\.weight and .*q_proj\.weight overlap",
      id="offsets-overlap"),
    R(C.header_edit(lambda h: h[C.Q0].__setitem__("dtype", "F7")), {}, CK, r"has unknown dtype 'F7'",
      id="dtype-unknown"),
    R(C.header_edit(lambda h: h[C.Q0].__setitem__("shape", [-64, -64])), {}, CK, r"shape \[-64, -64\].*integers >= 0",
      id="shape-negative"),
    R(C.header_edit(lambda h: h[C.Q0].__setitem__("shape", [64, 63])), {}, CK, r"needs 16128 bytes but its "
      r"data_offsets span 16384", id="shape-bytes-mismatch"),
    R(C.header_edit(lambda h: h.__setitem__("__metadata__", "x")), {}, CK, r"__metadata__ must be an object",
      id="metadata-string"),
    R(C.header_edit(lambda h: h.__setitem__(C.Q0, 7)), {}, CK, r"header entry of .* is 7", id="entry-not-object"),
    R(C.raw_header(b"[1, 2]"), {}, CK, r"its header is \[1, 2\] \(a list\), not an object", id="header-list"),
    R(C.raw_header(b"{nope"), {}, CK, r"its header is not valid JSON", id="header-not-json"),
    R(C.raw_header(b"{}", size=2**60), {}, CK, r"its header claims \d+ bytes in a file of", id="header-size-huge"),
    R(_dup_key, {}, CK, r"appears twice in the header", id="header-duplicate-tensor"),
    R(C.truncate(-100), {}, CK, r"is truncated: tensor .* needs bytes up to", id="truncated"),
    R(C.truncate(0), {}, CK, r"it has 0 bytes \(truncated or empty\)", id="empty-file"),
    R(C.truncate(5), {}, CK, r"it has 5 bytes", id="five-bytes"),
    # ---- tensors: values, shapes, dtypes, names
    R(C.poison(C.UP0, NAN), {}, CK, rf"tensor {C.UP0} in .*model\.safetensors holds NaN or inf", id="nan"),
    R(C.poison(C.UP0, -INF, torch.bfloat16), {}, CK, rf"tensor {C.UP0} in .* holds NaN or inf", id="inf-bf16"),
    R(C.poison(C.UP0, 1e6), {"dtype": torch.float16}, CK, r"values beyond torch\.float16's range.*bfloat16 or float32",
      id="overflow-in-fp16"),
    R(_with_state(lambda s: s.__setitem__(C.UP0, torch.zeros(3, 3))), {}, CK,
      rf"tensor {C.UP0} has shape \(3, 3\) in .* but the config implies \(128, 64\)", id="wrong-shape"),
    R(_with_state(lambda s: s.__setitem__(C.UP0, s[C.UP0].to(torch.int32))), {}, CK,
      r"has dtype torch\.int32; weights must be floating point", id="wrong-dtype"),
    R(_with_state(lambda s: s.pop(C.UP0)), {}, CK, rf"missing tensors: {C.UP0}", id="missing-tensor"),
    R(_with_state(lambda s: s.__setitem__("language_model.extra.weight", torch.zeros(2))), {}, CK,
      r"unexpected tensors: language_model\.extra\.weight", id="unexpected-tensor"),
    R(C.remove(C.WEIGHTS), {}, CK, r"no weights in", id="no-weights"),
    # ---- sharded checkpoints
    R(C.chain(C.sharded(None), C.remove("model-00002-of-00002.safetensors")), {}, CK,
      r"names shard\(s\) that are missing: model-00002-of-00002\.safetensors", id="index-missing-shard"),
    R(C.sharded(lambda wm, sh: wm.__setitem__("language_model.ghost.weight", "model-00001-of-00002.safetensors")),
      {}, CK, r"lists tensor language_model\.ghost\.weight in .* but no shard holds it", id="index-ghost-tensor"),
    R(C.sharded(lambda wm, sh: wm.__setitem__(C.Q0, "../model.safetensors")), {}, CK,
      r"maps to '\.\./model\.safetensors'.*a shard must be", id="index-path-traversal"),
    R(C.sharded(lambda wm, sh: wm.__setitem__(C.Q0, "weights.bin")), {}, CK, r"a shard must be a \*\.safetensors",
      id="index-pickle-shard"),
    R(C.sharded(_also_in_second), {}, CK, r"is in both .*model-00001.* and .*model-00002", id="duplicate-tensor"),
    R(C.sharded(lambda wm, sh: wm.pop(C.Q0)), {}, CK, rf"hold tensors that {INDEX} does not list: {C.Q0}",
      id="index-misses-tensor"),
    R(C.sharded(lambda wm, sh: wm.__setitem__(C.Q0, sorted(set(wm.values()) - {wm[C.Q0]})[0])), {}, CK,
      rf"lists tensor {C.Q0} in model-0000\d.* but it is in", id="index-wrong-shard"),
    R(C.chain(C.sharded(None), C.set_key(INDEX, "weight_map", {})), {}, CK, r"needs a non-empty \"weight_map\"",
      id="index-empty"),
    R(C.chain(C.sharded(None), C.raw(INDEX, "{")), {}, CK, r"index\.json' is not valid JSON", id="index-not-json"),
    # ---- pickled weights
    R(C.pickled({"x": torch.zeros(1)}), {}, CK, r"only has pickled weights.*allow_pickle=True", id="pickle-refused"),
    R(C.pickled({"x": 1}, raw_pickle=True), {"allow_pickle": True}, CK,
      r"cannot read pickled weights .*pytorch_model\.bin' with torch\.load", id="pickle-not-zip"),
    R(C.chain(C.pickled({}), C.raw("pytorch_model.bin", b"\x00garbage")), {"allow_pickle": True}, CK,
      r"cannot read pickled weights", id="pickle-garbage"),
    R(C.pickled([1, 2]), {"allow_pickle": True}, CK, r"does not hold a state dict", id="pickle-list"),
    # ---- arguments
    R(None, {"dtype": "int3"}, IN, r"dtype 'int3' is not supported", id="dtype-unknown-name"),
    R(None, {"dtype": torch.int8}, IN, r"dtype torch\.int8 is not supported", id="dtype-integer"),
    R(None, {"device": "banana"}, IN, r"device 'banana'", id="device-unknown"),
    R(None, {"device": "cuda:99"}, IN, r"device 'cuda:99'", id="device-absent"),
    R(None, {"allow_pickle": "yes"}, IN, r"allow_pickle must be True or False", id="allow-pickle-string"),
    R(None, {"quantize": "int3"}, IN, r"unknown quantization mode 'int3'", id="quantize-unknown"),
]

PROCESSOR_ROWS = [
    R(C.set_key(PROC, "feature_extractor.hop_length", 0), CK, r"processor_config\.json: feature_extractor\.hop_length "
      r"must be an integer from 1", id="hop-zero"),
    R(_preprocessor_only(hop_length=0), CK, r"preprocessor_config\.json: feature_extractor\.hop_length must be",
      id="preprocessor-hop-zero"),
    R(C.set_key(PROC, "feature_extractor.sampling_rate", "16k"), CK, r"sampling_rate must be an integer from 1000",
      id="rate-string"),
    R(C.set_key(PROC, "feature_extractor.n_fft", 10**9), CK, r"n_fft must be an integer from 2 to 65536",
      id="n-fft-huge"),
    R(C.set_key(PROC, "feature_extractor.chunk_length", 0), CK, r"chunk_length must be an integer from 1",
      id="chunk-zero"),
    R(C.set_key(PROC, "feature_extractor.chunk_length", 3600), CK, r"chunk_length x sampling_rate is 57600000",
      id="window-huge"),
    R(C.set_key(PROC, "feature_extractor.dither", -1), CK, r"dither must be a finite number >= 0", id="dither"),
    R(C.set_key(PROC, "feature_extractor.return_attention_mask", "yes"), CK, r"return_attention_mask must be true",
      id="mask-flag"),
    R(C.set_key(PROC, "feature_extractor.padding_side", "left"), CK, r"padding_side='left' is not supported",
      id="left-padding"),
    R(C.set_key(PROC, "feature_extractor", "whisper"), CK, r"feature_extractor must be an object", id="fe-string"),
    R(C.set_key(PROC, "feature_extractor.feature_size", 80), CK,
      r"num_mel_bins is 128 but the feature extractor makes 80 mel bins", id="mel-mismatch"),
    R(C.set_key(PROC, "feature_extractor.chunk_length", 10), CK,
      r"max_source_positions x 2 is 3000 but the feature extractor makes 1000 frames", id="frames-mismatch"),
    R(C.set_key(PROC, "max_audio_len", 10), CK, r"max_audio_len must be a number of seconds >= chunk_length \(30",
      id="max-audio-short"),
    R(C.set_key(PROC, "max_audio_len", "600"), CK, r"max_audio_len must be .*'600' \(a string\)",
      id="max-audio-string"),
    R(C.set_key(PROC, "max_audio_len", NAN), CK, r"max_audio_len must be .*nan", id="max-audio-nan"),
    R(C.set_key(PROC, "audio_token", 5), CK, r"audio_token must be a non-empty string", id="audio-token-int"),
    R(C.set_key(PROC, "audio_token", "<nope>"), CK, r"the tokenizer has no '<nope>' token", id="audio-token-absent"),
    R(C.set_key(PROC, "default_transcription_prompt", 7), CK, r"default_transcription_prompt must be a string",
      id="prompt-int"),
    R(C.raw(PROC, "{"), CK, r"processor_config\.json' is not valid JSON", id="processor-config-not-json"),
    R(C.set_key(TOK, "eos_token", "<nope>"), CK, r"names eos_token '<nope>', which tokenizer\.json does not have",
      id="eos-token-absent"),
    R(C.raw(TOK, "{}"), CK, r"sets neither eos_token nor pad_token", id="no-special-tokens"),
    R(C.set_key(TOK, "eos_token", 5), CK, r"tokenizer_config\.json: eos_token must be a token string",
      id="eos-token-int"),
    R(C.raw("chat_template.jinja", b"\xff\xfe{{ x }}"), CK, r"cannot read the chat template .*chat_template\.jinja",
      id="template-not-utf8"),
    R(C.raw("chat_template.jinja", "{% if %}"), CK, r"the chat template does not compile", id="template-broken"),
    R(C.raw("tokenizer.json", "garbage"), CK, r"cannot read .*tokenizer\.json", id="tokenizer-garbage"),
    R(C.remove("tokenizer.json"), CK, r"missing file .*tokenizer\.json", id="tokenizer-missing"),
    R(C.set_key(CFG, "audio_token_id", 1), CK, r"audio_token_id is 1 but tokenizer\.json gives '<sound>' the id 3",
      id="sound-id-mismatch"),
    R(C.set_key(CFG, "text_config.vocab_size", 300), CK, r"vocab_size is 300 but tokenizer\.json has token ids up to",
      id="vocab-smaller-than-tokenizer"),
]


def _copy(base, tmp_path, corrupt):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(base, folder)
    if corrupt is not None:
        corrupt(folder)
    return folder


def _check(excinfo, exc, pattern):
    err = excinfo.value
    assert type(err) is exc, f"{type(err).__name__} instead of {exc.__name__}: {err}"
    assert "\n" not in str(err), f"not one line: {err!r}"
    assert excinfo.match(pattern)


@pytest.mark.parametrize(("corrupt", "kwargs", "exc", "pattern"), MODEL_ROWS)
def test_bad_model_checkpoint(base, tmp_path, corrupt, kwargs, exc, pattern):
    folder = _copy(base, tmp_path, corrupt)
    with pytest.raises(AF3Error) as err:
        AF3Model.from_pretrained(folder, **kwargs)
    _check(err, exc, pattern)


@pytest.mark.parametrize(("corrupt", "exc", "pattern"), PROCESSOR_ROWS)
def test_bad_processor_files(base, tmp_path, corrupt, exc, pattern):
    folder = _copy(base, tmp_path, corrupt)
    with pytest.raises(AF3Error) as err:
        AF3Processor.from_pretrained(folder)
    _check(err, exc, pattern)


@pytest.mark.parametrize(("path", "exc", "pattern"), [
    R("config.json", CK, r"config\.json' is a file, not a checkpoint folder", id="file"),
    R("nope", CK, r"checkpoint folder .*nope' does not exist", id="missing"),
])
@pytest.mark.parametrize("loader", [AF3Model.from_pretrained, AF3Processor.from_pretrained, af3.load],
                         ids=["model", "processor", "af3.load"])
def test_model_path_that_is_not_a_folder(base, loader, path, exc, pattern):
    with pytest.raises(AF3Error) as err:
        loader(os.path.join(base, path))
    _check(err, exc, pattern)


@pytest.mark.parametrize("call", [
    R(lambda base: AF3Model.from_pretrained(None), id="model"),
    R(lambda base: AF3Processor.from_pretrained(42), id="processor"),
    R(lambda base: af3.load(b"/bytes/path"), id="af3.load"),
    R(lambda base: AF3Model.from_pretrained(base).save_pretrained(None), id="save"),
    R(lambda base: AF3Processor.from_pretrained(base).save_pretrained(None), id="processor-save"),
    R(lambda base: __import__("af3.convert").convert.convert_checkpoint(None, "out"), id="convert"),
])
def test_a_path_that_is_not_a_path_is_an_input_error(base, call):
    with pytest.raises(AF3Error) as err:
        call(base)
    _check(err, IN, r"must be a path \(str or os\.PathLike\), got")


@pytest.mark.parametrize(("corrupt", "exc", "pattern"), [
    R(C.set_key(GEN, "top_k", -1), CK, r"generation_config\.json: top_k must be an integer >= 0", id="gen-top-k"),
    R(C.set_key(PROC, "feature_extractor.hop_length", 0), CK, r"hop_length must be", id="processor-first"),
    R(C.poison(C.UP0, NAN), CK, r"holds NaN or inf", id="nan"),
])
def test_af3_load(base, tmp_path, corrupt, exc, pattern):
    folder = _copy(base, tmp_path, corrupt)
    with pytest.raises(AF3Error) as err:
        af3.load(folder)
    _check(err, exc, pattern)


# ---------------------------------------------------------------------------------------------- saving
def _quantized(folder):
    return AF3Model.from_pretrained(folder, quantize="int8")


def _meta(folder):
    from af3.config import AF3Config

    with torch.device("meta"):
        return AF3Model(AF3Config.from_file(os.path.join(folder, CFG)))


def _mutated(**changes):
    def build(folder):
        model = AF3Model.from_pretrained(folder)
        for dotted, value in changes.items():
            node = model.config
            *parents, leaf = dotted.split("__")
            for name in parents:
                node = getattr(node, name)
            setattr(node, leaf, value)
        return model
    return build


@pytest.mark.parametrize(("build", "target", "kwargs", "exc", "pattern"), [
    R(AF3Model.from_pretrained, "config.json", {}, IN, r"config\.json is a file, not a folder", id="onto-a-file"),
    R(AF3Model.from_pretrained, "config.json/sub", {}, IN, r"config\.json is a file, not a folder",
      id="under-a-file"),
    R(AF3Model.from_pretrained, "out", {"max_shard_bytes": 0}, IN, r"max_shard_bytes must be a positive integer",
      id="shard-size-zero"),
    R(AF3Model.from_pretrained, "out", {"max_shard_bytes": "5GB"}, IN, r"max_shard_bytes must be a positive",
      id="shard-size-string"),
    R(_mutated(audio_token_id=10**6), "out", {}, IN, r"cannot save .*audio_token_id 1000000 is outside the "
      r"vocabulary", id="config-audio-token"),
    R(_mutated(text_config__num_hidden_layers="four"), "out", {}, IN, r"cannot save .*num_hidden_layers must be",
      id="config-layers-string"),
    R(_mutated(text_config__hidden_size=48), "out", {}, IN, r"cannot save .*head_dim \(16\) x num_attention_heads",
      id="config-stale-head-dim"),
    R(_meta, "out", {}, IN, r"on the meta device", id="meta-model"),
    R(_quantized, "out", {}, IN, r"cannot save an int8-quantized model", id="quantized"),
])
def test_bad_save(base, tmp_path, build, target, kwargs, exc, pattern):
    model = build(base)
    before = C.tree(base)
    with pytest.raises(AF3Error) as err:
        model.save_pretrained(os.path.join(base, target) if target.startswith("config") else tmp_path / target,
                              **kwargs)
    _check(err, exc, pattern)
    assert C.tree(base) == before  # nothing was written
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- converting
LLM_CFG = "llm/config.json"
TOWER_W = "sound_tower/model.safetensors"


@pytest.mark.parametrize(("corrupt", "dst", "kwargs", "exc", "pattern"), [
    R(C.set_key(LLM_CFG, "num_hidden_layers", "four"), "out", {}, CK,
      r"llm/config\.json: text_config\.num_hidden_layers must be an integer", id="llm-config"),
    R(C.set_key("sound_tower/config.json", "d_model", "64"), "out", {}, CK,
      r"sound_tower/config\.json: audio_config\.hidden_size must be an integer", id="tower-config"),
    R(C.raw("llm/tokenizer.json", '{"added_tokens": [], "model": {"vocab": {}}}'), "out", {}, CK,
      r"cannot find the <sound> token", id="no-sound-token"),
    R(C.poison("layers.0.fc1.weight", NAN, file=TOWER_W), "out", {}, CK,
      r"tensor audio_tower\.layers\.0\.fc1\.weight in .*sound_tower/model\.safetensors holds NaN", id="nan"),
    R(C.poison("layers.0.fc1.weight", 1e6, file=TOWER_W), "out", {"dtype": torch.float16}, CK,
      r"beyond torch\.float16's range", id="overflow-fp16"),
    R(C.header_edit(lambda h: h["layers.0.fc1.weight"].__setitem__("dtype", "I32"), TOWER_W), "out", {}, CK,
      r"has dtype torch\.int32; weights must be floating point", id="int-weights"),
    R(None, "out", {"dtype": torch.int8}, IN, r"dtype torch\.int8 is not supported", id="dtype-int"),
    R(None, "out", {"max_shard_bytes": -1}, IN, r"max_shard_bytes must be a positive integer", id="shard-size"),
    R(None, "SRC/inside", {}, IN, r"overlap; writing one would replace the other", id="dst-inside-src"),
    R(None, "SRC", {}, IN, r"overlap", id="dst-is-src"),
    R(None, "PARENT", {}, IN, r"overlap", id="src-inside-dst"),
    R(None, "SRC/llm/config.json", {}, IN, r"is a file, not a folder; choose a folder path", id="dst-a-file"),
])
def test_bad_conversion(nvidia, tmp_path, corrupt, dst, kwargs, exc, pattern):
    from af3.convert import convert_checkpoint

    src = str(tmp_path / "nv")
    shutil.copytree(nvidia, src)
    if corrupt is not None:
        corrupt(src)
    before = C.tree(src)
    out = dst.replace("SRC", src).replace("PARENT", str(tmp_path)) if dst != "out" else str(tmp_path / "out")
    with pytest.raises(AF3Error) as err:
        convert_checkpoint(src, out, **kwargs)
    _check(err, exc, pattern)
    assert C.tree(src) == before and not (tmp_path / "out").exists()
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize(("src", "exc", "pattern"), [
    R("nope", CK, r"source checkpoint .*nope' does not exist", id="missing"),
    R("config.json", CK, r"source checkpoint .*config\.json' is a file", id="file"),
    R(".", CK, r"is not in NVIDIA's layout", id="hf-layout"),
])
def test_bad_conversion_source(base, tmp_path, src, exc, pattern):
    from af3.convert import convert_checkpoint

    with pytest.raises(AF3Error) as err:
        convert_checkpoint(os.path.join(base, src), tmp_path / "out")
    _check(err, exc, pattern)


# ---------------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize(("make", "exc", "pattern"), [
    R(lambda f: C.make_adapter(f, r="x"), CK, r"adapter_config\.json: r must be a positive integer", id="rank-string"),
    R(lambda f: C.make_adapter(f, r=0), CK, r"r must be a positive integer", id="rank-zero"),
    R(lambda f: C.make_adapter(f, alpha=NAN), CK, r"lora_alpha must be a finite number", id="alpha-nan"),
    R(lambda f: C.make_adapter(f, value=NAN), CK, r"lora_A\.weight in .* holds NaN or inf", id="nan"),
    R(lambda f: C.make_adapter(f, b_shape=(64, 3)), CK, r"lora_A \[4, 64\] and lora_B \[64, 3\]", id="ranks-differ"),
    R(lambda f: (C.make_adapter(f), C.raw("think/adapter_config.json", "{")(f)), CK,
      r"adapter_config\.json' is not valid JSON", id="config-json"),
    R(lambda f: (C.make_adapter(f), C.raw("think/adapter_model.safetensors", b"\x10")(f)), CK,
      r"adapter_model\.safetensors' is not a valid safetensors file", id="weights-garbage"),
])
def test_bad_adapter(base, tmp_path, make, exc, pattern):
    from af3.model.adapters import read_lora

    folder = _copy(base, tmp_path, None)
    os.makedirs(os.path.join(folder, "think"), exist_ok=True)
    make(folder)
    with pytest.raises(AF3Error) as err:
        read_lora(os.path.join(folder, "think"))
    _check(err, exc, pattern)


def test_garbage_non_lora_trainables_are_a_checkpoint_error(base, tmp_path):
    from af3.model.adapters import check_non_lora

    think = C.make_adapter(_copy(base, tmp_path, None))
    Path(think, "non_lora_trainables.bin").write_bytes(b"not a pickle")
    with pytest.raises(AF3Error) as err:
        check_non_lora(think, AF3Model.from_pretrained(base), allow_pickle=True)
    _check(err, CK, r"cannot read pickled weights .*non_lora_trainables\.bin")


# ---------------------------------------------------------------------------------------------- memory and CLI
def test_the_memory_check_runs_before_allocating_and_says_how_many_gb(base, monkeypatch):
    from af3 import config_checks

    monkeypatch.setattr(config_checks, "available_memory", lambda device: (1000, "available RAM"))
    with pytest.raises(CheckpointError, match=r"implies a model of 0\.0 GB in bfloat16 but there are 0\.0 GB "
                                              r"available RAM"):
        AF3Model.from_pretrained(base, dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["tiny", "tied"])
def test_parameter_count_from_the_config_equals_the_model(base, name):
    from af3.config import AF3Config
    from af3.config_checks import parameter_count

    config = AF3Config.from_file(os.path.join(base, CFG))
    config.text_config.tie_word_embeddings = name == "tied"
    with torch.device("meta"):
        model = AF3Model(config)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())
    assert math.isclose(parameter_count(AF3Config()), 8.267e9, rel_tol=1e-3)  # the real AF3 (7B decoder + encoder)


def test_cli_with_a_bad_checkpoint_prints_one_line_and_exits_2(base, tmp_path):
    from af3.cli import bundled_clip

    folder = _copy(base, tmp_path, C.set_key(CFG, "text_config.num_hidden_layers", "four"))
    exe = Path(sys.executable).parent / "af3"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "af3.cli"]
    out = subprocess.run([*cmd, "ask", str(bundled_clip()), "What is it?", "--model", folder],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "num_hidden_layers" in lines[0], out.stderr
