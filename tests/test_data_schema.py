"""Sample validation: boxes, records, broken reasons, sentence splitting fallback, seeds."""

from __future__ import annotations

import hashlib

import pytest

from finegrain.data.schema import (
    BrokenSample,
    mix_seed,
    parse_record,
    validate_box,
)


@pytest.mark.parametrize(
    "box",
    [[0.1, 0.2, 1.2, 0.5], [-0.1, 0.0, 0.5, 0.5], [0.6, 0.1, 0.2, 0.5], [0.1, 0.5, 0.4, 0.5],
     [0.1, 0.2, 0.3], "0 0 1 1", [0.1, "a", 0.3, 0.4], [0.1, float("nan"), 0.3, 0.4]],
)  # fmt: skip
def test_bad_boxes(box) -> None:
    with pytest.raises(BrokenSample) as e:
        validate_box(box)
    assert e.value.reason == "box"


def test_good_boxes_are_clipped_within_rounding() -> None:
    assert validate_box([0, 0, 1, 1]) == [0.0, 0.0, 1.0, 1.0]
    assert validate_box([-0.00005, 0.1, 1.00005, 0.2]) == [0.0, 0.1, 1.0, 0.2]
    assert validate_box((0.25, 0.5, 0.75, 1)) == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize(
    "record,reason",
    [([1, 2], "json"), ({}, "caption"), ({"caption": "  "}, "caption"), ({"caption": 3}, "json"),
     ({"caption": "a", "regions": {"box": [0, 0, 1, 1]}}, "json"),
     ({"caption": "a", "regions": [{"text": "t"}]}, "json"),
     ({"caption": "a", "regions": [{"text": "t", "box": [0, 0, 2, 1]}]}, "box"),
     ({"caption": "a", "label": "cat"}, "json"), ({"captions": [1, 2]}, "json")],
)  # fmt: skip
def test_broken_records(record, reason: str) -> None:
    with pytest.raises(BrokenSample) as e:
        parse_record(record, "k")
    assert e.value.reason == reason


def test_record_fields_and_meta() -> None:
    rec = {"caption": "alt", "captions": "one more", "long_caption": "A dog. A cat.",
           "regions": [{"text": "dog", "box": [0, 0, 0.5, 0.5], "score": 0.7}], "label": 2,
           "url": "http://x", "width": 10}  # fmt: skip
    out = parse_record(rec, "k1")
    assert out["key"] == "k1" and out["caption"] == "alt" and out["captions"] == ["one more"]
    assert out["sentences"] == ["A dog.", "A cat."] and out["label"] == 2
    assert out["regions"] == [{"text": "dog", "box": [0.0, 0.0, 0.5, 0.5], "score": 0.7}]
    assert out["meta"] == {"url": "http://x", "width": 10}
    assert parse_record({"alt": "x"}, "k", caption_key="alt")["caption"] == "x"
    only_sentences = parse_record({"sentences": ["s1", "s2"]}, "k")
    assert only_sentences["sentences"] == ["s1", "s2"] and only_sentences["caption"] == ""


def test_mix_seed_is_stable_and_spread() -> None:
    assert mix_seed(0, 1, 2) == mix_seed(0, 1, 2)
    seeds = {mix_seed(0, e, i) for e in range(3) for i in range(1000)}
    assert len(seeds) == 3000 and all(0 <= s < 2**63 for s in seeds)
    # defined by the bytes of repr(parts), not by Python's per-process salted hash()
    digest = hashlib.blake2b(b"(1, 'a', 2)", digest_size=8).digest()
    assert mix_seed(1, "a", 2) == int.from_bytes(digest, "little") >> 1
