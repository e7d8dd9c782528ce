"""Region-classification data: ground-truth boxes per image, their loaders and box checks.

Formats
- COCO-style instance JSON (``instances_val2017.json``): ``images: [{id, file_name, width,
  height}]``, ``annotations: [{image_id, bbox: [x, y, w, h] in pixels, category_id, iscrowd}]``,
  ``categories: [{id, name}]``. Crowd annotations (``iscrowd=1``) are skipped and counted.
  ``path`` may be a COCO folder as released (``annotations/instances_{train,val}2017.json``,
  ``train2017/``, ``val2017/``): ``split`` (default ``val``) picks the file.
- LVIS (``lvis_v1_val.json``): the same layout; images name their file through ``coco_url``
  (``.../val2017/000000397133.jpg``) when ``file_name`` is absent; categories carry
  ``frequency`` (r / c / f), which turns on per-frequency accuracy. Category names spell
  spaces as "_" (``aerosol_can``); prompts use spaces.
- The built-in scenes (``finegrain.data.synthetic_sets.eval_split("regions")``): every
  object's exact box, labelled by shape (``variant=shape``, 14 classes, with the generator's
  shape descriptions as ``descriptions=builtin``) or by colour (``variant=color``).

Bad boxes never stop an evaluation (``clean_boxes``): non-finite or zero/negative-area boxes
are skipped as ``skipped_degenerate``; boxes that do not overlap the image as
``skipped_box_outside``; boxes that overlap it partly are clipped (``clipped_boxes``).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from finegrain.config import finegrain_home
from finegrain.data.synthetic_sets import eval_split
from finegrain.eval.config import RegionTaskConfig
from finegrain.eval.containers import ImageItem
from finegrain.eval.formats import _check_images, _need_file
from finegrain.eval.templates import load_classnames
from finegrain.registry import suggest

REGION_DATASETS = ("synthetic", "coco", "lvis")
SYNTHETIC_REGION_VARIANTS = ("shape", "color")
FREQUENCIES = ("r", "c", "f")  # LVIS: rare, common, frequent


@dataclass
class RegionData:
    """``boxes[i]``: the boxes of ``images[i]`` as pixel ``[x0, y0, x1, y1]`` (unchecked: the
    evaluator clips, skips and counts bad ones), ``labels[i]`` their class indices.
    ``frequencies``: per class "r" | "c" | "f" (LVIS) or None; ``counts``: what the loader
    skipped (``skipped_crowd``, ``skipped_unknown_category``, ``skipped_unknown_image``)."""

    images: list[ImageItem]
    boxes: list[list[list[float]]]
    labels: list[list[int]]
    classnames: list[str]
    descriptions: dict[str, list[str]] | None = None
    frequencies: list[str] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    source: str = ""  # the annotation file's name (coco / lvis), for the protocol card

    def __post_init__(self) -> None:
        assert len(self.images) == len(self.boxes) == len(self.labels), "boxes/labels per image"
        if not self.classnames:
            raise ValueError("region dataset has no classes")
        for bs, ls in zip(self.boxes, self.labels):
            assert len(bs) == len(ls), "one label per box"
            bad = [y for y in ls if not 0 <= y < len(self.classnames)]
            if bad:
                raise ValueError(f"labels {bad[:5]} outside 0..{len(self.classnames) - 1}")
        if self.frequencies is not None:
            assert len(self.frequencies) == len(self.classnames), "one frequency per class"
            odd = sorted(set(self.frequencies) - set(FREQUENCIES))
            if odd:
                raise ValueError(f"category frequencies {odd} are not LVIS's r, c, f")

    @property
    def num_boxes(self) -> int:
        return sum(len(b) for b in self.boxes)


def clean_boxes(
    boxes: list[list[float]], labels: list[int], width: int, height: int, counts: Counter
) -> tuple[torch.Tensor, torch.Tensor]:
    """The usable boxes of one image, clipped to it: ((K, 4) float64 pixel xyxy, (K,) labels).
    Updates ``counts`` with ``skipped_degenerate`` (non-finite, zero or negative area, not four
    numbers), ``skipped_box_outside`` (no overlap with the image) and ``clipped_boxes``."""
    kept, kept_labels = [], []
    for box, label in zip(boxes, labels):
        ok = isinstance(box, (list, tuple)) and len(box) == 4
        vals = [float(v) for v in box] if ok else []
        if not ok or not all(math.isfinite(v) for v in vals):
            counts["skipped_degenerate"] += 1
            continue
        x0, y0, x1, y1 = vals
        if x1 <= x0 or y1 <= y0:
            counts["skipped_degenerate"] += 1
            continue
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            counts["skipped_box_outside"] += 1
            continue
        clipped = [max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))]
        counts["clipped_boxes"] += int(clipped != vals)
        kept.append(clipped)
        kept_labels.append(int(label))
    return (
        torch.tensor(kept, dtype=torch.float64).reshape(-1, 4),
        torch.tensor(kept_labels, dtype=torch.long),
    )


# ---- COCO / LVIS instance JSON ----------------------------------------------------------------
def _relative_path(im: dict, path: Path) -> str:
    """``file_name``, else ``<folder>/<file>`` of ``coco_url`` (LVIS)."""
    if im.get("file_name"):
        return str(im["file_name"])
    if im.get("coco_url"):
        return "/".join(PurePosixPath(str(im["coco_url"])).parts[-2:])
    raise ValueError(f"{path}: image {im.get('id')} has neither file_name nor coco_url")


def _image_paths(rels: list[str], path: Path, image_root: str) -> list[Path]:
    """Image files of the JSON: under ``image_root`` (default: the JSON's folder, its parent, or
    their ``<split>`` folder named by the JSON, e.g. ``val2017`` for ``instances_val2017.json``),
    as ``rel`` or its last component (LVIS's ``val2017/x.jpg`` under a ``val2017`` root)."""
    if image_root:
        roots = [Path(image_root).expanduser()]
    else:
        split = path.stem.rpartition("_")[2]  # instances_val2017.json -> val2017
        up = path.parent.parent  # coco/annotations/x.json: images in coco/val2017 or images/val2017
        roots = [path.parent, up, path.parent / split, up / split, up / "images" / split]
    first = rels[0]
    for root in roots:
        for strip in (False, True):
            if (root / (PurePosixPath(first).name if strip else first)).is_file():
                images = [root / (PurePosixPath(r).name if strip else r) for r in rels]
                _check_images(images, path)
                return images
    raise ValueError(
        f"image {first} referenced by {path} not found under {roots[0]}; set image_root="
    )


def _categories(data: dict, path: Path) -> tuple[dict[int, int], list[str], list[str] | None]:
    cats = sorted(data.get("categories") or [], key=lambda c: c["id"])
    if not cats:
        raise ValueError(f"{path} has no categories")
    index = {int(c["id"]): i for i, c in enumerate(cats)}
    names = [str(c.get("name", c["id"])).replace("_", " ").strip() for c in cats]
    freqs = [c.get("frequency") for c in cats]
    return index, names, (freqs if all(f in FREQUENCIES for f in freqs) else None)


def _skip_reason(a: dict, categories: dict, image_ids: set) -> str:
    """Why an annotation is left out before box checks ('' = kept)."""
    if a.get("iscrowd", 0):
        return "skipped_crowd"
    if a.get("image_id") not in image_ids:
        return "skipped_unknown_image"
    if a.get("category_id") not in categories:
        return "skipped_unknown_category"
    return ""


def _xyxy(bbox: Any) -> list[float]:
    """COCO ``[x, y, w, h]`` -> ``[x0, y0, x1, y1]``; anything else -> NaNs (degenerate)."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return [math.nan] * 4
    return [x, y, x + w, y + h]


def load_instances(path: Path, image_root: str = "", limit: int = 0) -> RegionData:
    """A COCO-style (or LVIS) instance JSON as ``RegionData`` (module docstring). Images
    without a usable annotation are left out; ``limit`` keeps the first N images."""
    try:
        data = json.loads(_need_file(path, "instance annotation file").read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise ValueError(f"{path} is not a COCO-style instance file (images, annotations)")
    index, names, freqs = _categories(data, path)
    image_ids = {im.get("id") for im in data["images"]}
    skips: dict = {}  # image id -> Counter of skipped annotations
    per_image: dict = {}  # image id -> (boxes, labels)
    for a in data["annotations"]:
        reason = _skip_reason(a, index, image_ids)
        if reason:
            skips.setdefault(a.get("image_id"), Counter())[reason] += 1
            continue
        boxes, labels = per_image.setdefault(a["image_id"], ([], []))
        boxes.append(_xyxy(a.get("bbox")))
        labels.append(index[a["category_id"]])
    entries = [im for im in data["images"] if im.get("id") in per_image]
    entries = entries[:limit] if limit > 0 else entries
    if not entries:
        raise ValueError(f"{path} holds no image with a non-crowd annotation")
    kept = {im["id"] for im in entries} if limit > 0 else set(skips)
    counts = Counter(skipped_crowd=0, skipped_unknown_category=0, skipped_unknown_image=0)
    for image_id in kept:
        counts.update(skips.get(image_id, Counter()))
    images = _image_paths([_relative_path(im, path) for im in entries], path, image_root)
    return RegionData(
        images,
        [per_image[im["id"]][0] for im in entries],
        [per_image[im["id"]][1] for im in entries],
        names,
        frequencies=freqs,
        counts=dict(counts),
    )


# ---- the built-in scenes ----------------------------------------------------------------------
def synthetic_regions(variant: str, num: int, image_size: int, seed: int = 10_000) -> RegionData:
    """Scenes of ``eval_split("regions")``: objects labelled by shape or by colour."""
    variant = variant or SYNTHETIC_REGION_VARIANTS[0]
    if variant not in SYNTHETIC_REGION_VARIANTS:
        raise ValueError(
            f"synthetic region variant '{variant}'{suggest(variant, SYNTHETIC_REGION_VARIANTS)}"
            f"; valid choices: {', '.join(SYNTHETIC_REGION_VARIANTS)}"
        )
    d = eval_split("regions", num, seed=seed, image_size=image_size)
    if variant == "shape":
        labels, names, desc = d["shapes"], d["classnames"], d["descriptions"]
    else:
        labels, names, desc = d["colors"], d["color_classnames"], None
    return RegionData(list(d["images"]), d["boxes"], labels, list(names), desc)


def _split_of(f: Path) -> str:
    """``instances_val2017.json`` -> ``val2017``; ``lvis_v1_val.json`` -> ``val``."""
    return f.stem.rpartition("_")[2]


def _annotation_file(path: Path, dataset: str, split: str) -> Path:
    """``path`` itself, or the one instance JSON in it / its ``annotations`` folder
    (``instances_*.json`` for coco, ``lvis*.json`` for lvis). Among several, ``split`` picks
    the file whose split part (after the last "_") is ``split`` or ``split`` plus a year:
    ``val`` picks ``instances_val2017.json`` of a standard COCO folder (not ``minival2014``)."""
    if not path.is_dir():
        return path
    pattern = "lvis*.json" if dataset == "lvis" else "instances_*.json"
    found = sorted([*path.glob(pattern), *(path / "annotations").glob(pattern)])
    if not found:
        raise ValueError(
            f"{path}: no {pattern} in it or in its annotations/ folder; set path= to the "
            f"{dataset} instance JSON"
        )
    if len(found) == 1:
        return found[0]
    picked = [f for f in found if re.fullmatch(rf"{re.escape(split)}\d*", _split_of(f))]
    if len(picked) == 1:
        return picked[0]
    named = ", ".join(f.name for f in (picked or found))
    choices = ", ".join(dict.fromkeys(_split_of(f) for f in found))
    raise ValueError(
        f"{path}: split='{split}' matches {len(picked) or 'none'} of {named}; "
        f"set split= to one of {choices} (or path= to one file)"
    )


def load_region_data(cfg: RegionTaskConfig, image_size: int = 64) -> RegionData:
    """The ``RegionData`` a ``RegionTaskConfig`` names (one-line errors for bad choices)."""
    if cfg.dataset not in REGION_DATASETS:
        raise ValueError(
            f"unknown region dataset '{cfg.dataset}'{suggest(cfg.dataset, REGION_DATASETS)}; "
            f"valid choices: {', '.join(REGION_DATASETS)}"
        )
    if cfg.dataset == "synthetic":
        data = synthetic_regions(cfg.variant, cfg.num_samples, cfg.image_size or image_size)
    else:
        path = Path(cfg.path).expanduser() if cfg.path else finegrain_home() / "data" / cfg.dataset
        path = _annotation_file(path, cfg.dataset, cfg.split)
        data = load_instances(path, cfg.image_root, cfg.limit)
        data.source = path.name
        if cfg.dataset == "lvis" and data.frequencies is None:
            raise ValueError(f"dataset=lvis but the categories of {path} have no frequency")
    if cfg.classnames:
        names = load_classnames(cfg.classnames)
        if len(names) != len(data.classnames):
            raise ValueError(
                f"classnames= gives {len(names)} names for {len(data.classnames)} categories"
            )
        data.classnames = names
    return data
