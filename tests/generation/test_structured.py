"""JSON-schema constrained decoding (llguidance) on the tiny checkpoint's byte-level BPE tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from af3 import AF3Processor
from af3.errors import InputError
from af3.generation.structured import JsonSchemaConstraint, build_tokenizer_info, validate_schema

SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 1, "maximum": 5},
        "pitch": {"enum": ["low", "medium", "high"]},
    },
    "required": ["count", "pitch"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return AF3Processor.from_pretrained(tiny_ckpt[0]).tokenizer


@pytest.fixture(scope="module")
def eos(tok):
    return [tok.eos_token_id]


def special_ids(tok) -> list[int]:
    return [i for i, t in tok.tokenizer.get_added_tokens_decoder().items() if t.special]


def ids_of(tok, text: str) -> list[int]:
    return tok.tokenizer.encode(text, add_special_tokens=False).ids


def check_schema(value) -> None:
    """A hand-written validator for SCHEMA."""
    assert isinstance(value, dict), value
    assert set(value) == {"count", "pitch"}, value
    assert isinstance(value["count"], int) and not isinstance(value["count"], bool), value
    assert 1 <= value["count"] <= 5, value
    assert value["pitch"] in ("low", "medium", "high"), value


def test_hand_validator_rejects_wrong_values():
    check_schema({"count": 5, "pitch": "low"})
    for bad in ({"count": 0, "pitch": "low"}, {"count": 2}, {"count": 2, "pitch": "loud"},
                {"count": 2.0, "pitch": "low"}, {"count": 2, "pitch": "low", "x": 1}, [1]):
        with pytest.raises(AssertionError):
            check_schema(bad)


def run_random(tok, eos, schema, seed: int, vocab: int, max_steps: int = 500) -> tuple[str, list[int]]:
    """Decode from random logits: at each step the argmax of random scores among the allowed tokens."""
    c = JsonSchemaConstraint(tok, schema, eos)
    g = torch.Generator().manual_seed(seed)
    never = torch.tensor(special_ids(tok))
    never = never[~torch.isin(never, torch.tensor(eos))]
    tokens: list[int] = []
    for _ in range(max_steps):
        allowed = c.allowed(vocab, "cpu")
        assert allowed.dtype == torch.bool and allowed.shape == (vocab,)
        assert allowed.any()
        assert not allowed[never].any(), "a special token was allowed inside JSON"
        assert not allowed[len(tok):].any(), "an id past the tokenizer's vocabulary was allowed"
        assert bool(allowed[eos].any()) == c.is_accepting()
        scores = torch.rand(vocab, generator=g).masked_fill(~allowed, -1.0)
        token = int(scores.argmax())
        c.advance(token)
        if token in eos:
            return tok.decode(tokens, skip_special_tokens=True), tokens
        tokens.append(token)
    raise AssertionError(f"no end token after {max_steps} steps: {tok.decode(tokens)!r}")


@pytest.mark.parametrize("seed", range(6))
def test_random_logits_give_valid_json(tok, eos, seed):
    vocab = len(tok) + 11  # the model's vocabulary may be padded past the tokenizer's
    text, _ = run_random(tok, eos, SCHEMA, seed, vocab)
    check_schema(json.loads(text))


def test_random_logits_cover_several_values(tok, eos):
    values = {json.dumps(json.loads(run_random(tok, eos, SCHEMA, s, len(tok))[0]), sort_keys=True) for s in range(6)}
    assert len(values) > 1  # the constraint does not force one answer


def test_mask_at_the_start_and_the_end(tok, eos):
    c = JsonSchemaConstraint(tok, SCHEMA, eos)
    vocab = len(tok)
    allowed = c.allowed(vocab, "cpu")
    brace = tok.token_id("{")
    assert allowed[brace]
    for letter in ("a", "c", "x", "[", '"', "1"):
        assert not allowed[tok.token_id(letter)], letter
    assert not allowed[eos].any()
    with pytest.raises(InputError):
        c.advance(eos[0])
    with pytest.raises(InputError):
        c.advance(tok.token_id("a"))
    # A rejected token leaves the state as it was: the valid text still goes through.
    text = '{"count": 4, "pitch": "low"}'
    ids = ids_of(tok, text)
    for i, t in enumerate(ids):
        assert not c.is_complete()
        assert not c.allowed(vocab)[eos].any(), f"end allowed after {tok.decode(ids[:i])!r}"
        c.advance(t)
    assert c.is_complete() and c.is_accepting()
    allowed = c.allowed(vocab, "cpu")
    assert allowed[eos].all() and allowed.sum() == len(eos)  # only the end token may follow
    with pytest.raises(InputError):
        c.advance(ids_of(tok, " ")[0])
    c.advance(eos[0])
    assert c.is_complete()


@pytest.mark.parametrize("text", ['{"count": 1, "pitch": "medium"}', '{"count":5,"pitch":"high"}',
                                  '{\n  "count": 3,\n  "pitch": "low"\n}'])
def test_forced_valid_json_is_accepted(tok, eos, text):
    c = JsonSchemaConstraint(tok, json.dumps(SCHEMA), eos)  # the schema may also come as JSON text
    for t in ids_of(tok, text):
        assert c.allowed(len(tok))[t], text
        c.advance(t)
    assert c.is_complete()
    c.advance(eos[0])


@pytest.mark.parametrize("text", ['{"count": 6, "pitch": "low"}', '{"count": 2, "pitch": "loud"}',
                                  '{"pitch": "low", "count": 2}', '{"count": 2}',
                                  '{"count": 2, "pitch": "low", "x": 1}'])
def test_forced_invalid_json_is_rejected(tok, eos, text):
    c = JsonSchemaConstraint(tok, SCHEMA, eos)
    with pytest.raises(InputError):
        for t in [*ids_of(tok, text), eos[0]]:
            c.advance(t)


def test_schema_none_is_any_object(tok, eos):
    assert validate_schema(None) == {"type": "object"}
    text = '{"a": [1, -2.5e3, {"b": null}], "c": "caf\u00e9 \u2603", "d": true}'
    c = JsonSchemaConstraint(tok, None, eos)
    allowed = c.allowed(len(tok))
    assert allowed[tok.token_id("{")] and not allowed[tok.token_id("[")] and not allowed[tok.token_id("1")]
    ids = ids_of(tok, text)
    for t in ids:  # multi-byte characters are split across byte-level tokens
        c.advance(t)
    assert c.is_complete()
    assert json.loads(tok.decode(ids)) == json.loads(text)


def test_top_level_number_can_end_before_it_is_complete(tok, eos):
    c = JsonSchemaConstraint(tok, {"type": "integer"}, eos)
    for t in ids_of(tok, "12"):
        c.advance(t)
    assert c.is_accepting() and not c.is_complete()  # more digits could follow
    allowed = c.allowed(len(tok))
    assert allowed[eos].all() and allowed[tok.token_id("7")]


@pytest.mark.parametrize("schema", [
    {"type": "objekt"},
    {"type": "integer", "minimum": 5, "maximum": 1},
    {"type": "array", "uniqueItems": True},
    {"properties": {"a": {"$ref": "#/definitions/missing"}}},
    {"type": "string", "format": "no-such-format"},
    "{not json",
    "[1, 2]",
    [{"type": "object"}],
    True,
])
def test_invalid_schema_is_input_error(tok, eos, schema):
    with pytest.raises(InputError):
        validate_schema(schema)
    with pytest.raises(InputError):
        JsonSchemaConstraint(tok, schema, eos)


def test_tokenizer_info_is_cached(tok, eos):
    a = build_tokenizer_info(tok, eos)
    assert build_tokenizer_info(tok, list(eos)) is a
    assert a.vocab_size == len(tok)
    assert build_tokenizer_info(tok, [*eos, tok.pad_token_id]) is not a


def test_grammar_engine_messages_are_made_readable():
    from af3.generation.structured import _first_line

    assert "vocabulary can continue the JSON" in _first_line("NoExtensionBias")
    assert "too complex" in _first_line("ParserTooComplex: 12000 items")
    assert _first_line("regex parse error:\n    [[[\n    ^\nerror: unclosed character class") == \
        "regex parse error: [[[ ^ error: unclosed character class"
    assert _first_line("  ") == "unknown error" and len(_first_line("x" * 1000)) == 300
