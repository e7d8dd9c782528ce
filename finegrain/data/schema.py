"""The sample schema (see ``docs/CONTRACTS.md``) and its validation.

A *record* is the JSON side of a sample (webdataset ``json``, a manifest row, a synthetic scene's
ground truth). ``parse_record`` turns it into the schema fields, raising ``BrokenSample`` with a
machine-readable ``reason`` for anything a training run must skip rather than crash on:

| reason | cause |
|---|---|
| ``decode`` | the image bytes cannot be decoded |
| ``json`` | the JSON side is not valid JSON / not an object |
| ``box`` | a region box is not 4 finite numbers in [0, 1] with x0 < x1 and y0 < y1 |
| ``caption`` | no caption at all (no ``caption``, ``captions``, ``long_caption`` or ``sentences``) |
| ``missing_image`` | the record names no image / the image file is missing |
| ``mask`` | the evaluation mask cannot be decoded or has the wrong size |
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from typing import Any

SCHEMA_KEYS = (
    "key", "seed", "image", "caption", "captions", "long_caption", "sentences", "regions",
    "label", "mask", "meta",
)  # fmt: skip
TEXT_FIELDS = ("caption", "captions", "long_caption", "sentences", "regions")
BROKEN_REASONS = ("decode", "json", "box", "caption", "missing_image", "mask")
BOX_TOLERANCE = 1e-4  # rounding slack allowed outside [0, 1] before a box counts as broken


class BrokenSample(Exception):
    """A sample to skip and count; ``reason`` is one of ``BROKEN_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in BROKEN_REASONS, f"unknown broken-sample reason {reason!r}"
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def mix_seed(*parts: Any) -> int:
    """A 63-bit seed hashed from ``parts`` (run seed, epoch, index, ...): stable across runs,
    processes and Python versions (unlike ``hash``), and well mixed for nearby inputs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_rng(seed: int, stage: str) -> random.Random:
    """The random stream of one *stage* of one sample: ``random.Random(mix_seed(seed, stage))``.

    Every random stage of a sample draws from its own stream, so changing one stage (a crop
    scale, the number of views) never shifts the draws of another (the sub-captions). Stages in
    use: ``"crop"``, ``"flip"`` (the ``image`` transform), ``"view0"``, ``"view1"``, ... (extra
    views), ``"caption"`` (caption choice), ``"subcaption"`` (FLAIR), ``"mask"`` (token masks).
    """
    if not isinstance(stage, str) or not stage:
        raise ValueError(f"sample_rng: stage must be a non-empty string, got {stage!r}")
    return random.Random(mix_seed(int(seed), stage))


def validate_box(box: Any) -> list[float]:
    """``[x0, y0, x1, y1]`` normalised to the image, clipped into [0, 1]; ``BrokenSample('box')``
    when it is malformed, outside the image (beyond rounding) or empty."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise BrokenSample("box", f"box must be [x0, y0, x1, y1], got {box!r}")
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        raise BrokenSample("box", f"box values must be numbers, got {box!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise BrokenSample("box", f"box has non-finite values {box!r}")
    if min(vals) < -BOX_TOLERANCE or max(vals) > 1 + BOX_TOLERANCE:
        raise BrokenSample("box", f"box {box!r} is outside [0, 1] (boxes are normalised)")
    x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in vals)
    if x1 <= x0 or y1 <= y0:
        raise BrokenSample("box", f"box {box!r} has x1 <= x0 or y1 <= y0")
    return [x0, y0, x1, y1]


def fallback_split_sentences(text: str) -> list[str]:
    """Split on newlines, ``</s>`` and sentence-final '.', '!' or '?' (used only when
    ``finegrain.data.captions`` is not available)."""
    parts = re.split(r"\n+|</s>|(?<=[.!?])\s+", text)
    return [p.strip() for p in parts if p and p.strip()]


def split_sentences(text: str) -> list[str]:
    """Sentences of a long caption: ``finegrain.data.captions.split_sentences`` when present."""
    try:
        from finegrain.data.captions import split_sentences as split
    except ImportError:
        return fallback_split_sentences(text)
    return list(split(text))


def _str_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v for v in value if v.strip()]
    raise BrokenSample("json", f"'{name}' must be a string or a list of strings")


def parse_regions(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BrokenSample("json", "'regions' must be a list of {text, box, score}")
    out = []
    for r in value:
        if not isinstance(r, dict) or "box" not in r:
            raise BrokenSample("json", f"region {r!r} must be an object with a 'box'")
        text = r.get("text", "")
        if not isinstance(text, str):
            raise BrokenSample("json", f"region text must be a string, got {text!r}")
        score = r.get("score", 1.0)
        out.append({"text": text, "box": validate_box(r["box"]), "score": float(score)})
    return out


def parse_record(record: Any, key: str, caption_key: str = "caption") -> dict[str, Any]:
    """Schema text fields of a JSON ``record``: caption, captions, long_caption, sentences,
    regions, label, meta (the remaining fields). ``caption_key`` names the raw alt-text key."""
    if not isinstance(record, dict):
        raise BrokenSample("json", f"sample '{key}': the JSON side must be an object")
    caption = record.get(caption_key, "")
    if caption is None:
        caption = ""
    if not isinstance(caption, str):
        raise BrokenSample("json", f"'{caption_key}' must be a string, got {type(caption)}")
    captions = _str_list(record.get("captions"), "captions")
    long_caption = record.get("long_caption") or ""
    if not isinstance(long_caption, str):
        raise BrokenSample("json", "'long_caption' must be a string")
    sentences = _str_list(record.get("sentences"), "sentences")
    if not sentences and long_caption.strip():
        sentences = split_sentences(long_caption)
    regions = parse_regions(record.get("regions"))
    if not (caption.strip() or captions or long_caption.strip() or sentences):
        raise BrokenSample("caption", f"sample '{key}' has no caption")
    label = record.get("label", -1)
    if isinstance(label, bool) or not isinstance(label, int):
        raise BrokenSample("json", f"'label' must be an integer, got {label!r}")
    used = {caption_key, "captions", "long_caption", "sentences", "regions", "label"}
    meta = {k: v for k, v in record.items() if k not in used}
    return {
        "key": key, "caption": caption, "captions": captions, "long_caption": long_caption,
        "sentences": sentences, "regions": regions, "label": label, "meta": meta,
    }  # fmt: skip
