"""Sentence splitting and FLAIR's diverse sub-caption sampler."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from finegrain.data.captions import (
    join_sentences,
    sample_subcaption_indices,
    sample_subcaptions,
    split_sentences,
)


def test_split_sentences_handles_breaks_abbreviations_and_decimals() -> None:
    text = (
        "Mr. Smith holds 3.5 apples, e.g. red ones. The sky is blue!\nA red car</s>Is it big? "
        "Dr. J. Watson waves, i.e. hello. There are cats, dogs etc. and birds. Last one."
    )
    assert split_sentences(text) == [
        "Mr. Smith holds 3.5 apples, e.g. red ones.",
        "The sky is blue!",
        "A red car",
        "Is it big?",
        "Dr. J. Watson waves, i.e. hello.",
        "There are cats, dogs etc. and birds.",
        "Last one.",
    ]
    assert split_sentences("") == []
    assert split_sentences(" \n </s> . ") == []
    assert split_sentences("Cats, dogs, etc. The end.") == ["Cats, dogs, etc.", "The end."]
    with pytest.raises(ValueError, match="expects a string"):
        split_sentences(["a list"])  # type: ignore[arg-type]


def test_join_sentences_adds_missing_periods() -> None:
    assert join_sentences(["A dog", "A cat!", " "]) == "A dog. A cat!"


def test_every_window_reachable_and_half_consecutive() -> None:
    n, rng = 6, random.Random(0)
    kinds: Counter = Counter()
    windows: set = set()
    for _ in range(400):
        for kind, idx in sample_subcaption_indices(n, 8, 3, rng):
            kinds[kind] += 1
            assert 1 <= len(idx) <= 3 and all(0 <= i < n for i in idx)
            if kind == "consecutive":
                assert idx == list(range(idx[0], idx[0] + len(idx)))
                windows.add(tuple(idx))
            if kind == "random":
                assert len(set(idx)) == len(idx)  # without replacement when possible
    # every window of 2 and 3 sentences, including the last ones (the released off-by-one)
    expected = {tuple(range(s, s + m)) for m in (2, 3) for s in range(n - m + 1)}
    assert windows == expected
    multi = kinds["consecutive"] + kinds["random"]
    assert abs(kinds["consecutive"] / multi - 0.5) < 0.05
    assert abs(kinds["single"] / sum(kinds.values()) - 1 / 3) < 0.05


def test_short_captions_sample_with_replacement() -> None:
    rng = random.Random(1)
    out = sample_subcaptions(["A dog.", "A cat."], 8, 3, rng)
    assert len(out) == 8
    for cap in out:
        assert set(cap.split(". ")) <= {"A dog", "A cat", "A dog.", "A cat."}
    picks = sample_subcaption_indices(1, 5, 3, random.Random(0))
    assert all(set(idx) == {0} for _, idx in picks)


def test_plain_string_is_never_sampled_char_by_char() -> None:
    out = sample_subcaptions("A red circle. A blue square.", 6, 2, random.Random(0))
    assert all(len(c) > 3 for c in out)
    assert set(" ".join(out).split(". ")) >= {"A red circle"} or "A red circle." in " ".join(out)
    for cap in out:
        assert cap.startswith("A ")


def test_deterministic_from_rng_and_modes() -> None:
    sents = [f"Sentence {i}." for i in range(10)]
    a = sample_subcaptions(sents, 8, 3, random.Random(42))
    assert a == sample_subcaptions(sents, 8, 3, random.Random(42))
    cons = sample_subcaption_indices(10, 50, 3, random.Random(0), mode="consecutive")
    assert {k for k, _ in cons} == {"consecutive"}
    rand = sample_subcaption_indices(10, 50, 3, random.Random(0), mode="random")
    assert {k for k, _ in rand} == {"random"}


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(ValueError, match="valid choices: diverse, consecutive, random"):
        sample_subcaptions(["a"], 2, 2, random.Random(0), mode="windows")
    with pytest.raises(ValueError, match="no non-empty sentence"):
        sample_subcaptions(["", "  "], 2, 2, random.Random(0))
    with pytest.raises(ValueError, match="k and max_sentences must be >= 1"):
        sample_subcaptions(["a"], 0, 2, random.Random(0))
    with pytest.raises(ValueError, match="must be strings"):
        sample_subcaptions([1, 2], 2, 2, random.Random(0))  # type: ignore[list-item]


def test_one_sentence_splitter_for_training_and_evaluation() -> None:
    """Training (FLAIR's pool, the schema's long captions) and evaluation (DOCCI/IIW sentence
    retrieval, class descriptions) split with the same function; the final period stays, as
    in FLAIR's released code."""
    from finegrain.data import schema
    from finegrain.eval import formats, templates
    from finegrain.methods import flair

    for module in (schema, formats, templates, flair):
        assert module.split_sentences is split_sentences, module.__name__
    assert split_sentences("A red star. A blue ring.") == ["A red star.", "A blue ring."]
