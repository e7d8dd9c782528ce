"""Sentence splitting and FLAIR's diverse sub-caption sampling.

FLAIR (Xiao et al., CVPR 2025, arXiv 2412.03561, Sec. 3 "diverse caption sampling")
splits a long (MLLM) caption into sentences and, for every image, samples K sub-captions of
1..S sentences each: half are *consecutive* windows of the caption, half are sentences taken
from *random* positions and concatenated.

Differences from the released code (``src/flair/data.py`` of ExplainableML/flair), on purpose:

- ``split_sentences`` does not split on every ``.``: decimals ("3.5"), abbreviations ("Mr.",
  "e.g.", "approx.") and initials stay inside their sentence; ``\\n`` and ``</s>`` still split.
- every consecutive window is reachable: the released ``draw_numbers(n - m)`` never starts a
  window at the last valid position ``n - m``.
- a plain string given where a list of sentences is expected is split into sentences first,
  never sampled character by character (``random.choice("a dog")`` returns a letter).

Kept from the released code: the number of sentences per sub-caption is uniform in
``1..max_sentences``; a single sentence is a uniform pick; for 2+ sentences a fair coin picks
"consecutive window" or "random positions" (positions without replacement, in drawn order);
when the caption has fewer sentences than needed, a window is the whole caption and random
positions are drawn *with* replacement (so short captions still give K sub-captions, with
repeats). All randomness comes from the ``random.Random`` passed in (the sample's seed).
"""

from __future__ import annotations

import random
import re

__all__ = ["split_sentences", "sample_subcaptions", "join_sentences", "SAMPLING_MODES"]

SAMPLING_MODES = ("diverse", "consecutive", "random")

# Lower-cased words (without the final dot) after which a "." does not end a sentence.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e eg ie approx appr no nos fig figs ca cf al "
    "inc ltd co corp dept est govt mt ft lt col gen sgt capt rev vol ed eds jan feb mar apr "
    "jun jul aug sep sept oct nov dec u.s u.k a.m p.m mins min sec hrs".split()
)
# Abbreviations that often end a sentence: only kept inside when a lowercase word follows.
_SOFT_ABBREVIATIONS = frozenset({"etc", "al", "co", "inc", "ltd", "a.m", "p.m", "u.s", "u.k"})
_HARD_BREAK = re.compile(r"\n+|</s>|<\|endoftext\|>")
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_END_PUNCT = (".", "!", "?", '"', "'", ")")


def _ends_sentence(chunk: str, cut: int, following: str) -> bool:
    """Whether the punctuation just before ``cut`` in ``chunk`` ends a sentence."""
    head = chunk[:cut].rstrip()
    if not head.endswith("."):
        return True  # "!" and "?" always end a sentence
    word = head.split()[-1].lstrip("(\"'[").rstrip(".\"')]").lower()
    if re.fullmatch(r"[a-z]", word):  # an initial, as in "J. Smith"
        return False
    if word in _ABBREVIATIONS:
        if word in _SOFT_ABBREVIATIONS:
            return bool(following[:1]) and not following[:1].islower()
        return False
    if re.fullmatch(r"(?:[a-z]\.)+[a-z]", word):  # dotted acronyms: "u.s.a."
        return False
    return True


def split_sentences(text: str) -> list[str]:
    """Split a (long) caption into sentences, stripped and non-empty.

    Splits on newlines, ``</s>`` and sentence-final ``.!?`` followed by whitespace; keeps
    decimals, abbreviations and initials inside their sentence. The final punctuation stays
    with its sentence. ``""`` gives ``[]``.
    """
    if not isinstance(text, str):
        raise ValueError(f"split_sentences expects a string, got {type(text).__name__}")
    sentences: list[str] = []
    for chunk in _HARD_BREAK.split(text):
        start = 0
        for m in _BOUNDARY.finditer(chunk):
            if _ends_sentence(chunk, m.start(), chunk[m.end() :]):
                sentences.append(chunk[start : m.start()])
                start = m.end()
        sentences.append(chunk[start:])
    return [s.strip() for s in sentences if s.strip().strip(".").strip()]


def join_sentences(sentences: list[str]) -> str:
    """Concatenate sentences into one sub-caption, adding a "." where one has no final
    punctuation (the released code joins dot-less pieces with ". ")."""
    parts = [s if s.endswith(_END_PUNCT) else s + "." for s in (x.strip() for x in sentences) if s]
    return " ".join(parts)


def _as_sentence_list(sentences: list[str] | str) -> list[str]:
    """FLAIR's trap: a plain string is split into sentences, never indexed char by char."""
    if isinstance(sentences, str):
        return split_sentences(sentences)
    if not isinstance(sentences, (list, tuple)):
        raise ValueError(f"sentences must be a list of strings, got {type(sentences).__name__}")
    bad = [type(s).__name__ for s in sentences if not isinstance(s, str)]
    if bad:
        raise ValueError(f"sentences must be strings, got items of type {sorted(set(bad))}")
    return [s.strip() for s in sentences if s.strip()]


def _window(n: int, m: int, rng: random.Random) -> list[int]:
    """Indices of a uniformly drawn consecutive window of m sentences (whole caption if m >= n).
    Starts range over 0..n-m inclusive, so every window is reachable."""
    if m >= n:
        return list(range(n))
    start = rng.randint(0, n - m)
    return list(range(start, start + m))


def _positions(n: int, m: int, rng: random.Random) -> list[int]:
    """m random positions: without replacement when possible, with replacement otherwise."""
    if n >= m:
        return rng.sample(range(n), m)
    return [rng.randrange(n) for _ in range(m)]


def sample_subcaption_indices(
    n: int, k: int, max_sentences: int, rng: random.Random, *, mode: str = "diverse"
) -> list[tuple[str, list[int]]]:
    """The index-level sampler behind ``sample_subcaptions``: K pairs (kind, sentence indices)
    with kind one of "single", "consecutive", "random"."""
    if mode not in SAMPLING_MODES:
        raise ValueError(
            f"unknown sampling mode '{mode}'; valid choices: {', '.join(SAMPLING_MODES)}"
        )
    if n < 1:
        raise ValueError("cannot sample sub-captions from a caption with no sentences")
    if k < 1 or max_sentences < 1:
        raise ValueError(
            f"k and max_sentences must be >= 1, got k={k}, max_sentences={max_sentences}"
        )
    out: list[tuple[str, list[int]]] = []
    for _ in range(k):
        m = rng.randint(1, max_sentences)
        if m == 1 and mode == "diverse":
            out.append(("single", [rng.randrange(n)]))
            continue
        consecutive = rng.random() < 0.5 if mode == "diverse" else mode == "consecutive"
        if consecutive:
            out.append(("consecutive", _window(n, m, rng)))
        else:
            out.append(("random", _positions(n, m, rng)))
    return out


def sample_subcaptions(
    sentences: list[str] | str,
    k: int,
    max_sentences: int,
    rng: random.Random,
    *,
    mode: str = "diverse",
) -> list[str]:
    """K sub-captions of 1..max_sentences sentences each (FLAIR Sec. 3, "diverse caption sampling").

    mode: "diverse" (released FLAIR: 1 sentence -> uniform pick; 2+ -> half consecutive
    windows, half random positions), "consecutive" (windows only) or "random" (positions
    only). Fewer sentences than needed: the window is the whole caption, random positions are
    drawn with replacement, and sub-captions repeat; K is always honoured. A plain string is
    split with ``split_sentences`` first. Raises ``ValueError`` when no sentence is left.
    """
    sents = _as_sentence_list(sentences)
    if not sents:
        raise ValueError("no non-empty sentence to sample sub-captions from")
    picks = sample_subcaption_indices(len(sents), k, max_sentences, rng, mode=mode)
    return [join_sentences([sents[i] for i in idx]) for _, idx in picks]
