"""Data of the hard-negative task (``finegrain.eval.hardneg``): FG-OVD's benchmark files, a
JSONL layout, and a built-in version generated from the synthetic scenes.

**FG-OVD** (github.com/lorebianchi98/FG-OVD, ``benchmarks/*.json``; ``dataset=fgovd``): one
LVIS/COCO-style JSON per benchmark. Fields read:
- ``images``: ``{id, file_name, width, height}``; ``file_name`` is relative to the COCO root
  (e.g. ``val2017/000000239627.jpg``), given as ``image_root`` (default: the JSON's folder);
- ``annotations``: ``{image_id, bbox: [x, y, w, h] in pixels, category_id, neg_category_ids}``;
- ``categories``: ``{id, name}``: ``name`` is the description ("A dark blue striped sponge.");
  the positive is the name of ``category_id``, the negatives those of ``neg_category_ids``
  (an id without a category is dropped and counted, ``skipped_unknown_negative_category``).
The benchmark is named by the file stem (``path`` a file, or ``path`` a folder and ``variant``
the stem): ``1_attributes`` / ``2_attributes`` / ``3_attributes`` (Hard / Medium / Easy: every
negative differs in 1 / 2 / 3 attributes -> ``acc1_diff<k>``), ``color`` / ``material`` /
``pattern`` / ``transparency`` (negatives change that attribute -> ``acc1_<kind>``),
``shuffle_negatives`` (Trivial). FG-OVD's protocol scores each box against its first N
negatives and drops boxes with fewer (``evaluation/ranks.py``, ``n_neg``): N = 10, except
``pattern`` (7) and ``transparency`` (2), whose boxes have fewer (``run_all_ranks.py`` caps
them); the default ``num_negatives=-1`` takes that per-file N, ``num_negatives=0`` all.

**JSONL** (``dataset=jsonl``), one box per line: ``image`` (or ``file_name``) relative to
``image_root``; the box as ``bbox: [x, y, w, h]`` in pixels (COCO) or ``box: [x0, y0, x1, y1]``
normalised to [0, 1] (finegrain's region convention), or neither (the whole image); the
positive as ``caption`` (or the first of ``captions``); ``neg_captions: [str]``; optional per
negative ``neg_diffs: [int]`` and ``neg_kinds: [str]`` (e.g. ``"color"``, ``"color+size"``).

**Built-in** (``dataset=synthetic``): every object of generated scenes (variant ``regions``:
1-4 objects, scored as crops; ``single``: one object per image, scored as the whole image) with
its exact description "a large red striped star" and negatives that change exactly k of
(color, pattern, size, shape): ``PER_KIND`` per attribute for k = 1, ``PER_LEVEL`` random
k-subsets for k = 2, 3.
"""

from __future__ import annotations

import json
import random
from itertools import combinations
from pathlib import Path
from typing import Any

from PIL import Image

from finegrain.data.config import SyntheticConfig
from finegrain.data.schema import mix_seed
from finegrain.data.synthetic import COLORS, PATTERNS, SHAPES, SIZES, generate_scene, object_phrase
from finegrain.eval.config import EvalTaskConfig
from finegrain.eval.hardneg import HardNegData, HardNegItem
from finegrain.registry import suggest

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": COLORS,
    "pattern": PATTERNS,
    "size": tuple(SIZES),
    "shape": SHAPES,
}
PER_KIND, PER_LEVEL, LEVELS = 2, 4, (1, 2, 3)
SYNTHETIC_VARIANTS = ("regions", "single")
FGOVD_BENCHMARKS: dict[str, tuple[str, int | None, str | None]] = {
    # stem: (FG-OVD name, attributes differing per negative, attribute kind changed)
    "1_attributes": ("hard", 1, None),
    "2_attributes": ("medium", 2, None),
    "3_attributes": ("easy", 3, None),
    "shuffle_negatives": ("trivial", None, None),
    "color": ("color", None, "color"),
    "material": ("material", None, "material"),
    "pattern": ("pattern", None, "pattern"),
    "transparency": ("transparency", None, "transparency"),
}

FGOVD_NUM_NEGATIVES = 10  # FG-OVD ranks.py's n_neg, per benchmark file unless capped below
FGOVD_FEWER_NEGATIVES = {"pattern": 7, "transparency": 2}  # run_all_ranks.py's caps


def fgovd_num_negatives(stem: str) -> int:
    """FG-OVD's negatives per box for benchmark ``stem`` (0 = all for a file it does not name)."""
    if stem not in FGOVD_BENCHMARKS:
        return 0
    return FGOVD_FEWER_NEGATIVES.get(stem, FGOVD_NUM_NEGATIVES)


# ---- built-in ----------------------------------------------------------------------------
def phrase(attrs: dict[str, str]) -> str:
    """'a large red striped star' (the scenes' own object phrase)."""
    return object_phrase({**attrs, "named": True})


def attribute_negatives(
    obj: dict[str, Any], rng: random.Random, per_kind: int = PER_KIND, per_level: int = PER_LEVEL
) -> list[tuple[str, int, str]]:
    """(text, number of attributes changed, '+'-joined changed kinds) per negative of ``obj``:
    ``per_kind`` values of each attribute for k = 1, ``per_level`` k-subsets for k >= 2."""
    base = {k: obj[k] for k in ATTRIBUTES}
    out, seen = [], {phrase(base)}

    def add(kinds: tuple[str, ...]) -> None:
        for _ in range(20):  # another value draw when the text already exists
            new = dict(base)
            for k in kinds:
                new[k] = rng.choice([v for v in ATTRIBUTES[k] if v != base[k]])
            text = phrase(new)
            if text not in seen:
                seen.add(text)
                out.append((text, len(kinds), "+".join(sorted(kinds))))
                return

    for kind in ATTRIBUTES:
        for _ in range(per_kind):
            add((kind,))
    for k in LEVELS[1:]:
        subsets = list(combinations(ATTRIBUTES, k))
        rng.shuffle(subsets)
        for j in range(per_level):
            add(subsets[j % len(subsets)])
    return out


def hardneg_scene(variant: str, i: int, image_size: int, seed: int = 10_000) -> dict[str, Any]:
    """Scene ``i`` of the built-in split (its ``objects`` are the ground truth)."""
    s = mix_seed("synthetic-eval", f"hardneg-{variant}", seed, i)
    cfg = SyntheticConfig(novel_object_prob=0.0)
    return generate_scene(s, image_size, cfg=cfg, num_objects=1 if variant == "single" else None)


def synthetic_hardneg(variant: str, num: int, image_size: int, seed: int = 10_000) -> HardNegData:
    """``num`` generated scenes; every object a box with its exact negatives."""
    if variant not in SYNTHETIC_VARIANTS:
        raise ValueError(
            f"synthetic hardneg variant '{variant}'{suggest(variant, list(SYNTHETIC_VARIANTS))};"
            f" valid choices: {', '.join(SYNTHETIC_VARIANTS)}"
        )
    images, items = [], []
    for i in range(num):
        scene = hardneg_scene(variant, i, image_size, seed)
        images.append(scene["image"])
        rng = random.Random(mix_seed(seed, i, "negatives"))
        for o in scene["objects"]:
            negs = attribute_negatives(o, rng)
            items.append(
                HardNegItem(
                    image=i,
                    box=tuple(o["box"]),
                    positive=phrase(o),
                    negatives=[t for t, _, _ in negs],
                    diffs=[d for _, d, _ in negs],
                    kinds=[k for _, _, k in negs],
                )
            )
    info = {"source": f"finegrain synthetic scenes ({variant}), seed {seed}"}
    return HardNegData(images, items, single_object=variant == "single", info=info)


# ---- FG-OVD benchmark JSON ------------------------------------------------------------------
def _benchmark_file(path: Path, variant: str) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"hardneg: no FG-OVD benchmark file or folder at {path}")
    found = sorted(p.stem for p in path.glob("*.json"))
    if variant and (path / f"{variant}.json").is_file():
        return path / f"{variant}.json"
    raise ValueError(
        f"hardneg fgovd: name the benchmark as variant (fgovd/<stem>=folder); "
        f"'{variant}'{suggest(variant, found)} not in {path}; valid: {', '.join(found) or 'none'}"
    )


def _category_names(raw: dict, where: Path) -> dict[int, str]:
    for key in ("images", "annotations", "categories"):
        if key not in raw:
            raise ValueError(f"{where}: an FG-OVD benchmark needs '{key}'; found {sorted(raw)}")
    return {int(c["id"]): str(c["name"]) for c in raw["categories"]}


def _size(im: dict, p: Path) -> tuple[int, int]:
    """(width, height) from the images entry, else from the file's header."""
    if im.get("width") and im.get("height"):
        return int(im["width"]), int(im["height"])
    with Image.open(p) as f:
        return f.size


def load_fgovd(path: Path, image_root: str, variant: str = "", limit: int = 0) -> HardNegData:
    """One FG-OVD benchmark (module docstring); images missing from disk are counted."""
    file = _benchmark_file(path, variant)
    raw = json.loads(file.read_text())
    names = _category_names(raw, file)
    root = Path(image_root).expanduser() if image_root else file.parent
    imgs = raw["images"][:limit] if limit > 0 else raw["images"]
    skipped = {"missing_image": 0, "bad_annotation": 0, "unknown_negative_category": 0}
    slot: dict[int, int] = {}
    images: list[Path] = []
    sizes: dict[int, tuple[int, int]] = {}
    for im in imgs:
        p = root / im["file_name"]
        if not p.is_file():
            continue
        try:
            sizes[im["id"]] = _size(im, p)
        except OSError:
            continue  # its boxes are counted as missing images
        slot[im["id"]] = len(images)
        images.append(p)
    stem = file.stem
    bench, diff, kind = FGOVD_BENCHMARKS.get(stem, (stem, None, None))
    listed = {im["id"] for im in imgs}
    items = []
    for a in raw["annotations"]:
        if a["image_id"] not in listed:
            continue
        if a["image_id"] not in slot:
            skipped["missing_image"] += 1
            continue
        if a.get("category_id") not in names or "bbox" not in a:
            skipped["bad_annotation"] += 1  # no known positive category, or no box
            continue
        neg_ids = a.get("neg_category_ids", [])
        negs = [names[n] for n in neg_ids if n in names]
        skipped["unknown_negative_category"] += len(neg_ids) - len(negs)  # per negative
        w, h = sizes[a["image_id"]]
        x, y, bw, bh = (float(v) for v in a["bbox"])
        box = (x / w, y / h, (x + bw) / w, (y + bh) / h)
        n = len(negs)
        items.append(
            HardNegItem(
                slot[a["image_id"]],
                box,
                names[a["category_id"]],
                negs,
                [diff] * n if diff else None,
                [kind] * n if kind else None,
            )
        )
    info = {"benchmark": f"FG-OVD {bench} ({stem})", "source": str(file)}
    skipped = {k: v for k, v in skipped.items() if v}
    return HardNegData(images, items, skipped, info=info, num_negatives=fgovd_num_negatives(stem))


# ---- JSONL ---------------------------------------------------------------------------------
def _jsonl_box(rec: dict, path: Path) -> tuple[float, float, float, float] | None:
    if "box" in rec:
        return tuple(float(v) for v in rec["box"])
    if "bbox" in rec:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
        x, y, bw, bh = (float(v) for v in rec["bbox"])
        return (x / w, y / h, (x + bw) / w, (y + bh) / h)
    return None


def _jsonl_item(rec: dict, slot: int, box: Any) -> HardNegItem:
    caps = rec.get("captions") or [""]
    pos = str(rec.get("caption") or caps[0] or "")
    negs = [str(n) for n in rec.get("neg_captions") or []]
    diffs, kinds = rec.get("neg_diffs"), rec.get("neg_kinds")
    if diffs is not None and len(diffs) != len(negs):
        raise ValueError(f"neg_diffs has {len(diffs)} entries for {len(negs)} neg_captions")
    if kinds is not None and len(kinds) != len(negs):
        raise ValueError(f"neg_kinds has {len(kinds)} entries for {len(negs)} neg_captions")
    return HardNegItem(slot, box, pos, negs, diffs and [int(d) for d in diffs], kinds)


def load_hardneg_jsonl(path: Path, image_root: str, limit: int = 0) -> HardNegData:
    """The JSONL layout (module docstring); bad lines and missing images are counted."""
    if not path.is_file():
        raise FileNotFoundError(f"hardneg: no JSONL file at {path}")
    root = Path(image_root).expanduser() if image_root else path.parent
    skipped = {"missing_image": 0, "unreadable_image": 0, "bad_line": 0}
    images: list[Path] = []
    slots: dict[str, int] = {}
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            name = str(rec.get("image") or rec["file_name"])
        except (json.JSONDecodeError, KeyError, AttributeError):
            skipped["bad_line"] += 1
            continue
        p = root / name
        if not p.is_file():
            skipped["missing_image"] += 1
            continue
        if name not in slots and limit > 0 and len(slots) >= limit:
            continue
        try:
            box = _jsonl_box(rec, p)
        except OSError:
            skipped["unreadable_image"] += 1
            continue
        try:
            item = _jsonl_item(rec, slots.setdefault(name, len(slots)), box)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        if item.image == len(images):
            images.append(p)
        items.append(item)
    single = all(it.box is None for it in items)
    info = {"source": str(path)}
    return HardNegData(images, items, {k: v for k, v in skipped.items() if v}, single, info)


def load_hardneg_data(cfg: EvalTaskConfig, image_size: int) -> HardNegData:
    """Dispatch of ``HardNegTaskConfig.dataset``: synthetic | fgovd | jsonl."""
    valid = ("synthetic", "fgovd", "jsonl")
    if cfg.dataset == "synthetic":
        return synthetic_hardneg(cfg.variant or "regions", cfg.num_samples, image_size)
    if cfg.dataset not in valid:
        raise ValueError(
            f"unknown hardneg dataset '{cfg.dataset}'{suggest(cfg.dataset, list(valid))}; "
            f"valid choices: {', '.join(valid)}"
        )
    if not cfg.path:
        raise ValueError(f"hardneg dataset={cfg.dataset} needs path= (the annotation file)")
    path = Path(cfg.path).expanduser()
    if cfg.dataset == "fgovd":
        return load_fgovd(path, cfg.image_root, cfg.variant, cfg.limit)
    return load_hardneg_jsonl(path, cfg.image_root, cfg.limit)
