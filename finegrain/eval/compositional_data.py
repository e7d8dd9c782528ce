"""Data of the compositionality task (``finegrain.eval.compositional``).

**SugarCrepe** (github.com/RAIVNLab/sugar-crepe, ``data/<kind>.json``; ``dataset=sugarcrepe``):
one JSON per kind, ``{id: {"filename", "caption", "negative_caption"}}``; ``filename`` is a
COCO val2017 image under ``image_root`` (default: the JSON's folder). ``path`` is the folder
(every ``*.json`` in it, or only ``variant``'s, e.g. ``sugarcrepe/swap_att``) or one file; the
kind is the file stem (``add_att``, ``replace_rel``, ...).

**Winoground** (``dataset=winoground``): ``examples.jsonl`` (``path``: the file or its folder)
with ``image_0``, ``image_1``, ``caption_0``, ``caption_1`` (``caption_k`` describes
``image_k``) and optional ``collapsed_tag`` (Object / Relation / Both) or ``tag``. Images are
``<image_root>/<image_k>`` with ``.png`` (the release), ``.jpg`` or ``.jpeg`` appended when the
name has no suffix; ``image_root`` defaults to ``images/`` next to the JSONL, else the JSONL's
folder; names that already start with ``images/`` are found either way.

**Built-in** (``dataset=synthetic``), from generated scenes with two objects:
- ``pairs``: the caption "a red circle to the left of a blue square" (relation along the axis
  of the larger centre offset, from the exact boxes) and one negative per kind: ``swap_att``
  (colours exchanged), ``swap_obj`` (the two object phrases reordered), ``replace_att`` (one
  colour replaced by one absent from the scene), ``replace_obj`` (one shape replaced by an
  absent one), ``replace_rel`` (the opposite relation); a kind whose negative would be true
  (both objects share the colour, ...) is left out for that scene;
- ``winoground``: 2x2 groups of two scenes: ``attribute`` groups swap the colours of the same
  two shapes ("a red circle and a blue square" / "a blue circle and a red square"); ``relation``
  groups hold the same two objects in opposite relations.
"""

from __future__ import annotations

import json
import random
from pathlib import Path, PurePosixPath
from typing import Any

from finegrain.data.config import SyntheticConfig
from finegrain.data.schema import mix_seed
from finegrain.data.synthetic import COLORS, SHAPES, generate_scene
from finegrain.eval.compositional import CompositionalData, CompositionalItem, WinogroundGroup
from finegrain.eval.config import EvalTaskConfig
from finegrain.registry import suggest

SYNTHETIC_VARIANTS = ("pairs", "winoground")
RELATIONS = {"left": "to the left of", "right": "to the right of", "up": "above", "down": "below"}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
MIN_OFFSET = 0.15  # centres closer than this (fraction of the image) make a relation ambiguous


# ---- built-in ------------------------------------------------------------------------------
def noun_phrase(color: str, shape: str) -> str:
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


def relation(a: dict, b: dict) -> str | None:
    """Where ``a`` is relative to ``b`` (left | right | up | down) along the axis of the larger
    centre offset; None when the centres are closer than ``MIN_OFFSET``."""
    dx = (a["box"][0] + a["box"][2] - b["box"][0] - b["box"][2]) / 2
    dy = (a["box"][1] + a["box"][3] - b["box"][1] - b["box"][3]) / 2
    if max(abs(dx), abs(dy)) < MIN_OFFSET:
        return None
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "up" if dy < 0 else "down"


def relation_caption(a: dict, rel: str, b: dict) -> str:
    """'a red circle to the left of a blue square'."""
    first, second = noun_phrase(a["color"], a["shape"]), noun_phrase(b["color"], b["shape"])
    return f"{first} {RELATIONS[rel]} {second}"


def scene_negatives(a: dict, b: dict, rel: str, rng: random.Random) -> list[tuple[str, str]]:
    """(negative caption, kind) for the true caption ``a rel b`` (module docstring)."""
    out = []
    swap = lambda o, key, v: {**o, key: v}  # noqa: E731
    if a["color"] != b["color"]:
        na, nb = swap(a, "color", b["color"]), swap(b, "color", a["color"])
        out.append((relation_caption(na, rel, nb), "swap_att"))
    if (a["color"], a["shape"]) != (b["color"], b["shape"]):
        out.append((relation_caption(b, rel, a), "swap_obj"))
    target = rng.choice(["a", "b"])
    free_c = [c for c in COLORS if c not in (a["color"], b["color"])]
    free_s = [s for s in SHAPES if s not in (a["shape"], b["shape"])]
    for key, free, kind in (("color", free_c, "replace_att"), ("shape", free_s, "replace_obj")):
        v = rng.choice(free)
        na, nb = (swap(a, key, v), b) if target == "a" else (a, swap(b, key, v))
        out.append((relation_caption(na, rel, nb), kind))
    out.append((relation_caption(a, OPPOSITE[rel], b), "replace_rel"))
    return out


def _two_objects(seed: int, image_size: int, objects: list[dict] | None = None) -> dict | None:
    """A two-object scene whose objects have a clear relation, or None."""
    cfg = SyntheticConfig(novel_object_prob=0.0)
    scene = generate_scene(seed, image_size, cfg=cfg, num_objects=2, objects=objects)
    objs = scene["objects"]
    if len(objs) != 2 or relation(objs[0], objs[1]) is None:
        return None
    return scene


def pair_scenes(num: int, image_size: int, seed: int = 10_000) -> list[dict[str, Any]]:
    """The ``num`` two-object scenes of the built-in ``pairs`` split (ground truth: objects)."""
    scenes, i = [], 0
    while len(scenes) < num:
        scene = _two_objects(mix_seed("synthetic-eval", "compositional-pairs", seed, i), image_size)
        i += 1
        # two objects alike in colour and shape make every relation true both ways
        if scene is not None and len({(o["color"], o["shape"]) for o in scene["objects"]}) == 2:
            scenes.append(scene)
    return scenes


def synthetic_pairs(num: int, image_size: int, seed: int = 10_000) -> CompositionalData:
    images, items = [], []
    for k, scene in enumerate(pair_scenes(num, image_size, seed)):
        a, b = scene["objects"]
        rel = relation(a, b)
        negs = scene_negatives(a, b, rel, random.Random(mix_seed(seed, k, "negatives")))
        caption = relation_caption(a, rel, b)
        items.append(CompositionalItem(k, caption, [n for n, _ in negs], [x for _, x in negs]))
        images.append(scene["image"])
    info = {"source": f"finegrain synthetic pairs, seed {seed}"}
    return CompositionalData(images, items, info=info)


def _group(rng: random.Random, s: int, image_size: int, kind: str) -> tuple[Any, ...] | None:
    """Two scenes and their captions for one 2x2 group of ``kind`` (attribute | relation)."""
    c0, c1 = rng.sample(COLORS, 2)
    s0, s1 = rng.sample(SHAPES, 2)
    common = {"pattern": "solid", "size": "medium"}
    first = [{"shape": s0, "color": c0, **common}, {"shape": s1, "color": c1, **common}]
    if kind == "attribute":
        second = [{"shape": s0, "color": c1, **common}, {"shape": s1, "color": c0, **common}]
    else:
        second = first
    for t in range(
        20
    ):  # re-place until both scenes have clear (and, for relations, opposite) layouts
        x = _two_objects(mix_seed(s, 0, t), image_size, first)
        y = _two_objects(mix_seed(s, 1, t), image_size, second)
        if x is None or y is None:
            continue
        (a, b), (a2, b2) = x["objects"], y["objects"]
        if kind == "attribute":
            caps = (
                f"{noun_phrase(c0, s0)} and {noun_phrase(c1, s1)}",
                f"{noun_phrase(c1, s0)} and {noun_phrase(c0, s1)}",
            )
            return x, y, caps
        r, r2 = relation(a, b), relation(a2, b2)
        if r2 == OPPOSITE[r]:
            return x, y, (relation_caption(a, r, b), relation_caption(b, r, a))
    return None


def winoground_scenes(num: int, image_size: int, seed: int = 10_000) -> list[tuple]:
    """The ``num`` groups of the built-in ``winoground`` split: (kind, scene 0, scene 1,
    (caption 0, caption 1)), alternating attribute and relation groups."""
    out, i = [], 0
    while len(out) < num:
        s = mix_seed("synthetic-eval", "compositional-winoground", seed, i)
        kind = ("attribute", "relation")[i % 2]
        i += 1
        made = _group(random.Random(s), s, image_size, kind)
        if made is not None:
            out.append((kind, *made))
    return out


def synthetic_winoground(num: int, image_size: int, seed: int = 10_000) -> CompositionalData:
    images, groups = [], []
    for kind, x, y, caps in winoground_scenes(num, image_size, seed):
        groups.append(WinogroundGroup((len(images), len(images) + 1), caps, kind))
        images += [x["image"], y["image"]]
    info = {"source": f"finegrain synthetic winoground groups, seed {seed}"}
    return CompositionalData(images, groups=groups, info=info)


# ---- SugarCrepe ----------------------------------------------------------------------------
def _sugarcrepe_files(path: Path, variant: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"compositional: no SugarCrepe folder or file at {path}")
    files = sorted(path.glob("*.json"))
    if variant:
        kinds = [v.strip() for v in variant.split("+") if v.strip()]
        stems = [f.stem for f in files]
        for k in kinds:
            if k not in stems:
                raise ValueError(
                    f"SugarCrepe kind '{k}'{suggest(k, stems)} not in {path}; "
                    f"valid: {', '.join(stems) or 'none'}"
                )
        files = [f for f in files if f.stem in kinds]
    if not files:
        raise ValueError(f"compositional: no <kind>.json files in {path}")
    return files


def load_sugarcrepe(
    path: Path, image_root: str, variant: str = "", limit: int = 0
) -> CompositionalData:
    """SugarCrepe's per-kind JSON files (module docstring); missing images are counted."""
    files = _sugarcrepe_files(path, variant)
    root = Path(image_root).expanduser() if image_root else files[0].parent
    images: list[Path] = []
    slots: dict[str, int] = {}
    items, missing = [], 0
    for f in files:
        entries = list(json.loads(f.read_text()).values())
        for e in entries[:limit] if limit > 0 else entries:
            p = root / e["filename"]
            if not p.is_file():
                missing += 1
                continue
            if e["filename"] not in slots:
                slots[e["filename"]] = len(images)
                images.append(p)
            neg = e.get("negative_caption") or []
            negs = [neg] if isinstance(neg, str) else list(neg)
            items.append(
                CompositionalItem(
                    slots[e["filename"]], e.get("caption") or "", negs, [f.stem] * len(negs)
                )
            )
    info = {"source": ", ".join(str(f) for f in files)}
    return CompositionalData(images, items, skipped={"missing_image": missing}, info=info)


# ---- Winoground ----------------------------------------------------------------------------
def _image_file(roots: list[Path], name: str) -> Path | None:
    """``name`` (with ``.png`` / ``.jpg`` / ``.jpeg`` appended when it has no suffix) under the
    first root that holds it; a name that already starts with the images folder
    (``images/ex_0_img_0``) is also looked up as its last component."""
    names = list(dict.fromkeys([name, PurePosixPath(name).name]))
    for root in roots:
        for n in names:
            p = root / n
            if PurePosixPath(n).suffix and p.is_file():
                return p
            for ext in (".png", ".jpg", ".jpeg"):
                if (root / f"{n}{ext}").is_file():
                    return root / f"{n}{ext}"
    return None


def load_winoground(path: Path, image_root: str, limit: int = 0) -> CompositionalData:
    """Winoground's ``examples.jsonl`` (module docstring); missing images are counted."""
    file = path / "examples.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"compositional: no Winoground examples.jsonl at {path}")
    default = [file.parent / "images", file.parent]  # images/ next to the JSONL, or beside it
    roots = [Path(image_root).expanduser()] if image_root else default
    images: list[Path] = []
    groups, skipped = [], {"missing_image": 0, "bad_line": 0}
    lines = [x for x in file.read_text().splitlines() if x.strip()]
    for line in lines[:limit] if limit > 0 else lines:
        try:
            r = json.loads(line)
            names, caps = (r["image_0"], r["image_1"]), (r["caption_0"], r["caption_1"])
        except (json.JSONDecodeError, KeyError, TypeError):
            skipped["bad_line"] += 1
            continue
        found = [_image_file(roots, str(n)) for n in names]
        if None in found:
            skipped["missing_image"] += 1
            continue
        tag = str(r.get("collapsed_tag") or r.get("tag") or "")
        pair = (len(images), len(images) + 1)
        groups.append(WinogroundGroup(pair, (str(caps[0]), str(caps[1])), tag))
        images += found
    kept = {k: v for k, v in skipped.items() if v}
    return CompositionalData(images, groups=groups, skipped=kept, info={"source": str(file)})


def load_compositional_data(cfg: EvalTaskConfig, image_size: int) -> CompositionalData:
    """Dispatch of ``CompositionalTaskConfig.dataset``: synthetic | sugarcrepe | winoground."""
    valid = ("synthetic", "sugarcrepe", "winoground")
    if cfg.dataset == "synthetic":
        variant = cfg.variant or "pairs"
        if variant not in SYNTHETIC_VARIANTS:
            raise ValueError(
                f"synthetic compositional variant '{variant}'"
                f"{suggest(variant, list(SYNTHETIC_VARIANTS))}; "
                f"valid choices: {', '.join(SYNTHETIC_VARIANTS)}"
            )
        make = synthetic_pairs if variant == "pairs" else synthetic_winoground
        return make(cfg.num_samples, image_size)
    if cfg.dataset not in valid:
        raise ValueError(
            f"unknown compositional dataset '{cfg.dataset}'{suggest(cfg.dataset, list(valid))}; "
            f"valid choices: {', '.join(valid)}"
        )
    if not cfg.path:
        raise ValueError(
            f"compositional dataset={cfg.dataset} needs path= (annotation file or folder)"
        )
    path = Path(cfg.path).expanduser()
    if cfg.dataset == "sugarcrepe":
        return load_sugarcrepe(path, cfg.image_root, cfg.variant, cfg.limit)
    return load_winoground(path, cfg.image_root, cfg.limit)
