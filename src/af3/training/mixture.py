"""Data mixtures (``data.mixture``): NVIDIA's ``"2.0*asr+1.0*qa"`` syntax, dicts and lists → [(weight, manifest)].

Pure text handling (no torch), so the config loader checks a mixture's syntax and weights when it reads the YAML
(:func:`parse_mixture` with ``must_exist=False``) and makes its relative manifest paths absolute against the
YAML's folder (:func:`resolve_mixture_paths`); the trainer resolves it against the files when it starts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InputError

_MANIFEST_SUFFIXES = (".json", ".jsonl")


def parse_mixture(spec: str | Mapping | Sequence, named: Mapping[str, str] | None = None,
                  must_exist: bool = True) -> list[tuple[float, str]]:
    """A data mixture → [(weight, manifest path)].

    ``spec`` is NVIDIA's ``"2.0*asr+1.0*qa"`` syntax (a term without ``*`` has weight 1), a dict
    ``{name_or_path: weight}``, or a list of terms (strings like ``"2*asr"``, ``(weight, name)`` pairs or
    ``{"path"|"name": ..., "weight": ...}``). Names are keys of ``named`` (name → manifest path); anything else
    must be an existing manifest file (``must_exist=False`` only checks the syntax and the weights and keeps
    such names as they are). Every weight must be a finite number > 0.
    """
    named = dict(named or {})
    out: list[tuple[float, str]] = []
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise InputError("the data mixture is empty")
        terms = [text] if _is_known(text, named) else text.split("+")  # a path may itself contain "+"
        out = [_parse_term(t, named, must_exist) for t in terms]
    elif isinstance(spec, Mapping):
        out = [(check_weight(w, f"{name}: {w}"), _resolve_name(name, named, must_exist)) for name, w in spec.items()]
    elif isinstance(spec, Sequence):
        for item in spec:
            if isinstance(item, (str, os.PathLike)):
                out.append(_parse_term(os.fspath(item), named, must_exist))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                out.append((check_weight(item[0], repr(item)), _resolve_name(item[1], named, must_exist)))
            elif isinstance(item, Mapping) and ("path" in item or "name" in item):
                name = item.get("path", item.get("name"))
                out.append((check_weight(item.get("weight", 1.0), repr(dict(item))),
                            _resolve_name(name, named, must_exist)))
            else:
                raise InputError(f"bad data mixture entry {item!r}: use \"WEIGHT*NAME\", (weight, name) or "
                                 "{\"path\": ..., \"weight\": ...}")
    else:
        raise InputError(f"a data mixture is a string, a dict or a list, not a {type(spec).__name__}")
    if not out:
        raise InputError("the data mixture is empty")
    return out


def _is_known(name: str, named: Mapping[str, str]) -> bool:
    return name in named or os.path.isfile(name)


def _parse_term(term: str, named: Mapping[str, str], must_exist: bool = True) -> tuple[float, str]:
    text = term.strip()
    if not text:
        raise InputError("the data mixture has an empty term (a stray '+')")
    if _is_known(text, named) or "*" not in text:
        return 1.0, _resolve_name(text, named, must_exist)
    weight, _, name = text.partition("*")
    try:
        value = float(weight)
    except ValueError:
        raise InputError(f"bad data mixture term {term!r}: expected WEIGHT*NAME, like 2.0*asr") from None
    return check_weight(value, term), _resolve_name(name.strip(), named, must_exist)


def check_weight(weight: Any, term: str) -> float:
    ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight) and weight > 0
    if not ok:
        raise InputError(f"bad data mixture term {term!r}: the weight must be a positive number")
    return float(weight)


def _resolve_name(name: Any, named: Mapping[str, str], must_exist: bool = True) -> str:
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name:
        raise InputError(f"bad data mixture name {name!r}")
    if name in named:
        return os.fspath(named[name])
    if not must_exist or os.path.isfile(name):
        return name
    known = ", ".join(sorted(named)) or "none"
    what = "a folder" if os.path.isdir(name) else "not a manifest file"
    raise InputError(f"unknown dataset {name!r} in the data mixture: not a named dataset (known: {known}) and "
                     f"{what}")


# ---------------------------------------------------------------------- relative paths

def _absolute(name: Any, named: Mapping[str, Any], base: str) -> Any:
    """A mixture name made absolute against ``base`` when it is a manifest path: an existing file under ``base``,
    or text that looks like a path (a folder separator, ``~``, a .json/.jsonl name). Names of ``named`` and bare
    words stay as they are (so a misspelt name is reported as a name)."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip() or name in named or "://" in name:
        return name
    text = os.path.expanduser(name.strip())
    if os.path.isabs(text):
        return os.path.normpath(text)
    candidate = os.path.normpath(os.path.join(base, text))
    looks_like_path = "/" in text or os.sep in text or text.lower().endswith(_MANIFEST_SUFFIXES)
    return candidate if looks_like_path or os.path.isfile(candidate) else name


def _absolute_term(term: str, named: Mapping[str, Any], base: str) -> str:
    text = term.strip()
    if not text or text in named or os.path.isfile(os.path.join(base, os.path.expanduser(text))) or "*" not in text:
        return _absolute(text, named, base) if text else term
    weight, _, name = text.partition("*")
    return f"{weight.strip()}*{_absolute(name.strip(), named, base)}"


def resolve_mixture_paths(spec: Any, named: Mapping[str, Any] | None, base: str) -> Any:
    """``spec`` (any :func:`parse_mixture` form) with its relative manifest paths made absolute against ``base``;
    weights, names and the form are kept. Values that are not a mixture are returned unchanged (the config check
    reports them)."""
    named = named if isinstance(named, Mapping) else {}
    if isinstance(spec, str):
        text = spec.strip()
        if not text or text in named:
            return spec
        whole = os.path.join(base, os.path.expanduser(text))
        if os.path.isfile(whole):
            return os.path.normpath(whole)
        return "+".join(_absolute_term(t, named, base) for t in text.split("+"))
    if isinstance(spec, Mapping):
        return {_absolute(k, named, base): w for k, w in spec.items()}
    if isinstance(spec, (list, tuple)):
        out: list[Any] = []
        for item in spec:
            if isinstance(item, (str, os.PathLike)):
                out.append(_absolute_term(os.fspath(item), named, base))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                out.append([item[0], _absolute(item[1], named, base)])
            elif isinstance(item, Mapping) and ("path" in item or "name" in item):
                key = "path" if "path" in item else "name"
                out.append({**item, key: _absolute(item[key], named, base)})
            else:
                out.append(item)
        return out
    return spec
