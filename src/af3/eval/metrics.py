"""Scores: word and character error rates (jiwer, after Whisper's English normalisation), a deterministic
multiple-choice matcher, exact match / contains / label sets, and 95% confidence intervals.

The multiple-choice matcher tries three rules in order and records which one matched; when none does, the
prediction is ``unmatched`` (counted as wrong and reported), never guessed:

1. ``letter``: the prediction names an option letter: the whole answer is a letter ("B", "b", "(B)", "B."), it
   starts with one followed by ")", "." or ":" ("B) a dog"), it holds a parenthesised letter ("... (B) ..."), or it
   says "answer is B" / "answer: B" / "option B". Only letters of the item's options count, and a bare "A"
   followed by a space (the article: "A dog barks") is not a letter.
2. ``text``: the normalised text of exactly one option appears in the normalised prediction (when several do,
   the longest wins if it contains all the others, e.g. "dog" inside "dog barking"; otherwise no match).
3. ``similar``: the option most similar to the prediction (difflib ratio of the normalised strings) when its
   ratio is at least :data:`SIMILAR_MIN` and beats the runner-up by :data:`SIMILAR_MARGIN`.
"""

from __future__ import annotations

import difflib
import math
import random
import re
from collections.abc import Sequence
from functools import lru_cache

#: The similarity rule's floor and its required lead over the second-best option.
SIMILAR_MIN = 0.6
SIMILAR_MARGIN = 0.1
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@lru_cache(maxsize=1)
def _english():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    """Whisper's English normalisation (lower case, punctuation and fillers removed, numbers and spellings
    standardised), as the paper's ASR numbers use."""
    return " ".join(_english()(text or "").split())


def _simple(text: str) -> str:
    """Lower case, punctuation to spaces, one space between words (for option matching)."""
    return " ".join(re.sub(r"[^\w\s]", " ", (text or "").lower()).split())


# ------------------------------------------------------------------------------------------------- ASR
def edit_counts(reference: str, hypothesis: str) -> dict[str, int]:
    """Word and character edits of a normalised hypothesis against a normalised reference (corpus rates sum
    these over items: errors / reference length)."""
    import jiwer

    ref, hyp = normalize(reference), normalize(hypothesis)
    out = {"ref_words": len(ref.split()), "ref_chars": len(ref)}
    if not ref:
        out.update(word_errors=len(hyp.split()), char_errors=len(hyp))
        return out
    words = jiwer.process_words(ref, hyp if hyp else "")
    chars = jiwer.process_characters(ref, hyp if hyp else "")
    out["word_errors"] = words.substitutions + words.deletions + words.insertions
    out["char_errors"] = chars.substitutions + chars.deletions + chars.insertions
    return out


def corpus_rate(items: Sequence[dict], errors: str, length: str) -> float:
    total = sum(i[length] for i in items)
    return sum(i[errors] for i in items) / total if total else float("nan")


def bootstrap_interval(items: Sequence[dict], errors: str, length: str, rounds: int = 1000,
                       seed: int = 0) -> tuple[float, float]:
    """95% interval of a corpus error rate by resampling items (percentile bootstrap, fixed seed)."""
    if len(items) < 2:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    pairs = [(i[errors], i[length]) for i in items]
    rates = []
    for _ in range(rounds):
        sample = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        total = sum(n for _, n in sample)
        if total:
            rates.append(sum(e for e, _ in sample) / total)
    rates.sort()
    return (rates[int(0.025 * (len(rates) - 1))], rates[int(0.975 * (len(rates) - 1))]) if rates else (
        float("nan"), float("nan"))


# ------------------------------------------------------------------------------------------------- accuracy
def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound for small n and for 0% / 100%)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _letter(prediction: str, letters: str) -> str | None:
    text = prediction.strip()
    found = re.fullmatch(r"[(\[]?\s*([A-Za-z])\s*[)\].:]?", text)
    if found and found.group(1).upper() in letters:
        return found.group(1).upper()
    found = re.match(r"[(\[]?([A-Z])\s*[)\].:](?:\s|$)", text)  # "B) a dog", "(B) a dog", "B. a dog"
    if found and found.group(1) in letters:
        return found.group(1)
    found = re.search(r"(?i:answer|option|choice)\s*(?i:is|:)?\s*[(\[]?([A-Z])[)\]]?(?![\w'])", text)
    if found and found.group(1) in letters:
        return found.group(1)
    inner = set(re.findall(r"\(([A-Z])\)", text)) & set(letters)
    return inner.pop() if len(inner) == 1 else None


def match_choice(prediction: str, choices: Sequence[str]) -> tuple[int | None, str]:
    """The option a prediction picks → (its index or None, the rule: letter, text, similar or unmatched)."""
    letters = LETTERS[: len(choices)]
    letter = _letter(prediction or "", letters)
    if letter is not None:
        return letters.index(letter), "letter"
    pred = _simple(prediction)
    options = [_simple(c) for c in choices]
    inside = [i for i, o in enumerate(options) if o and re.search(rf"(?<!\w){re.escape(o)}(?!\w)", pred)]
    if len(inside) == 1:
        return inside[0], "text"
    if inside:
        longest = max(inside, key=lambda i: len(options[i]))
        if all(options[i] in options[longest] for i in inside) and \
                sum(len(options[i]) == len(options[longest]) for i in inside) == 1:
            return longest, "text"
        return None, "unmatched"
    ratios = sorted(((difflib.SequenceMatcher(None, pred, o).ratio(), i) for i, o in enumerate(options)),
                    reverse=True)
    if ratios and ratios[0][0] >= SIMILAR_MIN and (len(ratios) == 1 or ratios[0][0] - ratios[1][0] >= SIMILAR_MARGIN):
        return ratios[0][1], "similar"
    return None, "unmatched"


def answer_index(answer: str, choices: Sequence[str]) -> int | None:
    """Which option a reference answer is: its exact text, else its letter ("B" or "(B)")."""
    for i, c in enumerate(choices):
        if _simple(c) == _simple(answer):
            return i
    letter = re.fullmatch(r"\(?([A-Z])\)?", (answer or "").strip())
    if letter and LETTERS.index(letter.group(1)) < len(choices):
        return LETTERS.index(letter.group(1))
    return None


def exact_match(prediction: str, answer: str) -> bool:
    return _simple(prediction) == _simple(answer)


def contains(prediction: str, answer: str) -> bool:
    a = _simple(answer)
    return bool(a) and re.search(rf"(?<!\w){re.escape(a)}(?!\w)", _simple(prediction)) is not None


def names_only(prediction: str, answer: str, labels: Sequence[str]) -> bool:
    """Label-set scoring: the prediction is the answer label, or names it and no other label of the set."""
    if _simple(prediction) == _simple(answer):
        return True
    named = {_simple(label) for label in labels if contains(prediction, label)}
    named = {n for n in named if not any(n != m and n in m for m in named)}  # "dog" inside "dog barking"
    return named == {_simple(answer)}
