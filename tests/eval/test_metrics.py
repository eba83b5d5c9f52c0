"""The scorers against hand-worked answers: the multiple-choice matcher on a table of tricky predictions (each with
the rule that must decide it), WER/CER on strings whose edits are counted by hand, the intervals against their
formulas, and label-set / contains matching."""

from __future__ import annotations

import math

import pytest

from af3.eval import metrics as M

CHOICES = ["Dog barking", "Cat meowing", "Car horn", "Rain falling"]

MCQ = [
    # prediction, expected option index (None = unmatched), rule
    ("(B)", 1, "letter"),
    ("b", 1, "letter"),
    ("B", 1, "letter"),
    ("B.", 1, "letter"),
    ("The answer is B.", 1, "letter"),
    ("answer: (C)", 2, "letter"),
    ("Option D", 3, "letter"),
    ("C) Car horn", 2, "letter"),
    ("I hear a car, so (C).", 2, "letter"),
    ("Cat meowing", 1, "text"),
    ("cat meowing.", 1, "text"),
    ("A dog barking loudly in a yard", 0, "text"),  # "A" is the article here, not option A
    ("It is the sound of rain falling on a roof", 3, "text"),
    ("Car horns", 2, "similar"),
    ("rain fall", 3, "similar"),
    ("none of these", None, "unmatched"),
    ("I am not sure.", None, "unmatched"),
    ("", None, "unmatched"),
    ("Either a dog barking or a cat meowing", None, "unmatched"),  # two options named: never guessed
    ("(E)", None, "unmatched"),  # not an option of this item
]


def levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


@pytest.mark.parametrize(("prediction", "index", "rule"), MCQ)
def test_the_matcher_decides_each_tricky_prediction_by_its_rule(prediction, index, rule):
    assert M.match_choice(prediction, CHOICES) == (index, rule)


def test_an_option_inside_a_longer_option_picks_the_longer_one():
    choices = ["dog", "dog barking", "cat"]
    assert M.match_choice("a dog barking", choices) == (1, "text")
    assert M.match_choice("a dog", choices) == (0, "text")


def test_none_of_these_matches_when_it_is_an_option():
    assert M.match_choice("None of the above.", ["Dog", "Cat", "None of the above"]) == (2, "text")


def test_reference_answers_are_found_by_text_or_letter():
    assert M.answer_index("Car horn", CHOICES) == 2
    assert M.answer_index("car horn", CHOICES) == 2
    assert M.answer_index("(D)", CHOICES) == 3
    assert M.answer_index("Thunder", CHOICES) is None


def test_word_and_character_edits_are_counted_after_whisper_normalisation():
    # "Mr." → "mister", "twenty-one" → "21", punctuation and case dropped: no edits at all.
    assert M.edit_counts("Mr. Smith has 21 apples.", "mister smith has twenty-one apples") == {
        "ref_words": 5, "ref_chars": len("mister smith has 21 apples"), "word_errors": 0, "char_errors": 0}
    # one substitution (cat→bat), one deletion (the), one insertion (loudly): 3 word errors over 5 words
    counts = M.edit_counts("the cat sat on the", "bat sat on loudly the")
    assert counts["word_errors"] == 3 and counts["ref_words"] == 5
    # characters (spaces included, as jiwer counts them): an independent edit distance
    assert counts["char_errors"] == levenshtein("the cat sat on the", "bat sat on loudly the")
    assert counts["ref_chars"] == 18


def test_corpus_rates_sum_edits_over_items_not_average_item_rates():
    items = [{"e": 1, "n": 10}, {"e": 3, "n": 2}]
    assert M.corpus_rate(items, "e", "n") == pytest.approx(4 / 12)  # not (0.1 + 1.5) / 2


def test_wilson_interval_matches_its_formula_and_stays_inside_0_1():
    lo, hi = M.wilson_interval(8, 10)
    z, p, n = 1.959964, 0.8, 10
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert M.wilson_interval(0, 5)[0] == 0.0 and M.wilson_interval(5, 5)[1] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in M.wilson_interval(0, 0))


def test_bootstrap_interval_brackets_the_rate_and_is_reproducible():
    items = [{"e": i % 3, "n": 5} for i in range(40)]
    rate = M.corpus_rate(items, "e", "n")
    lo, hi = M.bootstrap_interval(items, "e", "n")
    assert lo < rate < hi
    assert (lo, hi) == M.bootstrap_interval(items, "e", "n")
    constant = [{"e": 1, "n": 4}] * 10
    assert M.bootstrap_interval(constant, "e", "n") == (0.25, 0.25)


def test_exact_contains_and_label_sets():
    assert M.exact_match("Dog barking.", "dog barking")
    assert not M.exact_match("a dog barking", "dog barking")
    assert M.contains("I hear a dog barking loudly", "dog barking")
    assert not M.contains("hotdog barking", "dog barking")  # whole words only
    labels = ["dog", "cat", "dog barking"]
    assert M.names_only("It is a dog barking.", "dog barking", labels)  # "dog" is inside the named label
    assert not M.names_only("a dog or a cat", "dog", labels)  # two labels named
    assert not M.names_only("a cat", "dog", labels)
