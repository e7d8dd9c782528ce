"""The built-in synthetic scenes: seeded, rendered on the fly, ground truth for every task.

A scene holds 1-4 non-overlapping objects on a textured background. Each object has a shape,
colour, fill pattern, size and position; the scene comes with
- ``caption``: coarse, noisy alt-text (mentions only some objects, sometimes vaguely);
- ``captions``: one short clean caption naming every object;
- ``long_caption`` / ``sentences``: one sentence per object plus one for the background
  (FLAIR-style long captions);
- ``regions``: one description + normalised box per object (GRAIN-style), with optional box
  jitter and dropped regions imitating detector noise;
- ``instance_mask`` / ``semantic_mask`` (0 = background, 1 + index into ``ALL_SHAPES``);
- ``objects`` and ``label`` (ALL_SHAPES index of the largest object).

**Novel concepts.** ``NOVEL_SHAPES`` never appear by name in training text: training scenes may
contain them (``SyntheticConfig.novel_object_prob``) but describe them only by appearance, e.g.
"a red shape with six equal sides". Zero-shot classification over them can use names only or
names + ``DESCRIPTIONS`` (GRAIN's class-description idea, Halbe et al., Sec. 4).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from finegrain.data.config import SyntheticConfig
from finegrain.data.schema import mix_seed
from finegrain.data.synthetic_render import (
    ASPECT,
    BACKGROUND_KINDS,
    BACKGROUND_TONES,
    COLOR_RGB,
    background,
    pattern_fill,
    shape_mask,
)

SHAPES = (
    "circle", "square", "triangle", "star", "pentagon", "diamond", "cross", "heart",
    "crescent", "ring", "arrow", "semicircle", "oval", "rectangle",
)  # fmt: skip
NOVEL_SHAPES = ("hexagon", "octagon", "trapezoid", "parallelogram")
ALL_SHAPES = SHAPES + NOVEL_SHAPES
COLORS = tuple(COLOR_RGB)
PATTERNS = ("solid", "striped", "dotted", "checkered")
SIZES = {"small": (0.2, 0.26), "medium": (0.3, 0.37), "large": (0.42, 0.5)}  # side / image

# Every description starts with "a shape", so attributes slot in: "a red shape with ...".
DESCRIPTIONS: dict[str, list[str]] = {
    "circle": ["a shape that is perfectly round", "a shape with one curved edge and no corners"],
    "square": ["a shape with four equal sides and four right angles", "a shape like a box"],
    "triangle": ["a shape with three sides and three corners", "a shape pointing up"],
    "star": ["a shape with five pointed tips", "a shape with spiky points around a center"],
    "pentagon": ["a shape with five equal sides", "a shape with five corners and a pointed top"],
    "diamond": ["a shape with four sides standing on a corner", "a shape like a tilted box"],
    "cross": ["a shape made of two crossing bars", "a shape like a plus sign"],
    "heart": ["a shape with two rounded lobes and a point at the bottom",
              "a shape like a symbol of love"],
    "crescent": ["a shape like a thin curved moon", "a shape with a curved bite taken out"],
    "ring": ["a shape that is round with a hole in the middle", "a shape like a donut"],
    "arrow": ["a shape pointing to the right with a triangular head",
              "a shape with a bar and a pointed tip"],
    "semicircle": ["a shape that is half of a circle", "a shape with a flat bottom and a round top"],
    "oval": ["a shape that is round and stretched wide", "a shape like an egg lying down"],
    "rectangle": ["a shape with four right angles that is wider than tall",
                  "a shape like a flat box"],
    "hexagon": ["a shape with six equal sides", "a shape like a honeycomb cell"],
    "octagon": ["a shape with eight equal sides", "a shape like a stop sign"],
    "trapezoid": ["a shape with four sides and a short flat top",
                  "a shape whose top is narrower than its bottom"],
    "parallelogram": ["a shape with four sides slanted to one side",
                      "a shape like a leaning box"],
}  # fmt: skip
assert set(DESCRIPTIONS) == set(ALL_SHAPES), "every shape needs descriptions"


def position_words(box: list[float]) -> str:
    """'at the top left', 'on the right', 'in the center', ... from a normalised box."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    h = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    v = "top" if cy < 0.4 else "bottom" if cy > 0.6 else ""
    if h and v:
        return f"at the {v} {h}"
    if v:
        return f"at the {v}"
    if h:
        return f"on the {h}"
    return "in the center"


def object_phrase(obj: dict[str, Any], *, size=True, color=True, pattern=True) -> str:
    """'a large red striped star'; novel shapes (unless ``obj['named']``) by appearance."""
    words = [
        w for w, on in ((obj["size"], size), (obj["color"], color), (obj["pattern"], pattern)) if on
    ]
    attrs = " ".join(words)
    if obj["shape"] in NOVEL_SHAPES and not obj.get("named", False):
        desc = obj["description"]  # "a shape with six equal sides"
        return f"a {attrs} {desc[2:]}" if attrs else desc
    article_word = attrs or obj["shape"]
    article = "an" if article_word[0] in "aeiou" else "a"
    return f"{article} {attrs + ' ' if attrs else ''}{obj['shape']}"


def join_phrases(phrases: list[str]) -> str:
    """'a, b and c'."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _place(rng: np.random.Generator, shape: str, size: str, image_size: int, taken: list):
    """A free (x, y, w, h) pixel box for the object, or None when nothing fits."""
    lo, hi = SIZES[size]
    for _ in range(40):
        w = max(6, int(round(rng.uniform(lo, hi) * image_size)))
        h = max(4, int(round(w * ASPECT.get(shape, 1.0))))
        x = int(rng.integers(1, max(2, image_size - w)))
        y = int(rng.integers(1, max(2, image_size - h)))
        if all(
            x + w + 1 <= a or a + c + 1 <= x or y + h + 1 <= b or b + d + 1 <= y
            for a, b, c, d in taken
        ):
            return x, y, w, h
    return None


def _sample_shape(rng: np.random.Generator, cfg: SyntheticConfig, novel: bool) -> str:
    if novel:
        return NOVEL_SHAPES[int(rng.integers(len(NOVEL_SHAPES)))]
    if rng.random() < cfg.novel_object_prob:
        return NOVEL_SHAPES[int(rng.integers(len(NOVEL_SHAPES)))]
    return SHAPES[int(rng.integers(len(SHAPES)))]


def _render_objects(rng, cfg, image_size, n, novel, forced, tone_override=None):
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    tones = list(BACKGROUND_TONES)
    tone = tones[int(rng.integers(len(tones)))]  # drawn even when overridden: same stream after
    tone = tone_override or tone
    canvas = background(kind, tone, image_size, rng)  # (S, S, 3)
    inst = np.zeros((image_size, image_size), dtype=np.int32)
    objects, taken = [], []
    for i in range(n):
        spec = dict(forced[i]) if forced and i < len(forced) else {}
        shape = spec.get("shape") or _sample_shape(rng, cfg, novel)
        color = spec.get("color") or COLORS[int(rng.integers(len(COLORS)))]
        pattern = spec.get("pattern") or PATTERNS[int(rng.integers(len(PATTERNS)))]
        size = spec.get("size") or list(SIZES)[int(rng.integers(len(SIZES)))]
        place = None
        for s in [size] + [z for z in ("medium", "small") if z != size]:
            place = _place(rng, shape, s, image_size, taken)
            if place is not None:
                size = s
                break
        if place is None:
            continue
        x, y, w, h = place
        taken.append(place)
        m = shape_mask(shape, w, h)  # (h, w)
        rgb = np.array(COLOR_RGB[color], dtype=np.float32) + rng.integers(-12, 13, 3)
        tex = pattern_fill(pattern, np.clip(rgb, 0, 255), h, w, max(w, h))
        region = canvas[y : y + h, x : x + w]
        region[m] = tex[m]
        inst[y : y + h, x : x + w][m] = len(objects) + 1
        ys, xs = np.nonzero(m)
        box = [
            float(x + xs.min()) / image_size,
            float(y + ys.min()) / image_size,
            float(x + xs.max() + 1) / image_size,
            float(y + ys.max() + 1) / image_size,
        ]
        descs = DESCRIPTIONS[shape]
        objects.append(
            {
                "shape": shape,
                "color": color,
                "pattern": pattern,
                "size": size,
                "box": box,
                "area": int(m.sum()),
                "description": descs[int(rng.integers(len(descs)))],
                "named": novel,
            }
        )
    return canvas, objects, inst, (kind, tone)


def _noisy_caption(rng: np.random.Generator, objects: list[dict], bg: str) -> str:
    """Web-alt-text-like: a random subset of objects with random attributes, or vague text."""
    r = rng.random()
    if r < 0.15:
        vague = [
            "some shapes",
            "colorful shapes",
            "abstract picture",
            "shapes on a background",
            "image",
            f"shapes on a {bg} background",
            "geometric clip art",
        ]
        return vague[int(rng.integers(len(vague)))]
    k = int(rng.integers(1, len(objects) + 1))
    chosen = [objects[i] for i in sorted(rng.choice(len(objects), k, replace=False))]
    phrases = [
        object_phrase(
            o, size=rng.random() < 0.3, color=rng.random() < 0.7, pattern=rng.random() < 0.3
        )
        for o in chosen
    ]
    text = join_phrases(phrases)
    if rng.random() < 0.3:
        text = ["stock image of ", "picture: ", "clipart ", "photo of "][
            int(rng.integers(4))
        ] + text
    return text


def _sentence(rng: np.random.Generator, obj: dict) -> str:
    p, where = object_phrase(obj), position_words(obj["box"])
    t = int(rng.integers(3))
    if t == 0:
        return f"{p[0].upper()}{p[1:]} is {where}."
    if t == 1:
        return f"There is {p} {where}."
    return f"{where[0].upper()}{where[1:]} there is {p}."


def _regions(rng: np.random.Generator, objects: list[dict], cfg: SyntheticConfig) -> list[dict]:
    out = []
    for o in objects:
        if cfg.drop_region_prob > 0 and rng.random() < cfg.drop_region_prob:
            continue
        box, score = list(o["box"]), 1.0
        if cfg.box_jitter > 0:
            w, h = box[2] - box[0], box[3] - box[1]
            noise = rng.normal(0.0, cfg.box_jitter, 4) * np.array([w, h, w, h])
            b = np.clip(np.array(box) + noise, 0.0, 1.0)
            x0, x1 = sorted((b[0], b[2]))
            y0, y1 = sorted((b[1], b[3]))
            if x1 - x0 > 1e-3 and y1 - y0 > 1e-3:
                box = [float(x0), float(y0), float(x1), float(y1)]
            score = float(rng.uniform(0.5, 1.0))
        out.append({"text": object_phrase(o), "box": box, "score": score})
    return out


def generate_scene(
    seed: int,
    image_size: int = 64,
    *,
    cfg: SyntheticConfig | None = None,
    novel: bool = False,
    num_objects: int | None = None,
    objects: list[dict] | None = None,
    background_tone: str | None = None,
) -> dict[str, Any]:
    """Render one scene, deterministic in ``seed``.

    novel: every object is a novel shape and text *names* it (evaluation only; training scenes
        describe novel shapes by appearance). objects: optional per-object attribute overrides
        (``{"shape": ..., "color": ..., "pattern": ..., "size": ...}``) used by eval splits.
    background_tone: force the background's tone (a ``BACKGROUND_TONES`` or ``SPURIOUS_TONES``
        name; the spurious-correlation scenes), else one drawn at random.
    """
    cfg = cfg or SyntheticConfig()
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if not 1 <= cfg.min_objects <= cfg.max_objects:
        raise ValueError("need 1 <= synthetic.min_objects <= synthetic.max_objects")
    rng = np.random.default_rng(seed)
    n = num_objects or int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    canvas, objs, inst, (kind, tone) = _render_objects(
        rng, cfg, image_size, n, novel, objects, background_tone
    )
    bg_sentence = f"The background is a {tone} {kind} texture."
    sentences = [_sentence(rng, o) for o in objs] + [bg_sentence]
    semantic = np.zeros_like(inst)
    for i, o in enumerate(objs):
        semantic[inst == i + 1] = 1 + ALL_SHAPES.index(o["shape"])
    largest = max(objs, key=lambda o: o["area"])
    return {
        "image": Image.fromarray(canvas.astype(np.uint8), "RGB"),
        "caption": _noisy_caption(rng, objs, tone),
        "captions": [join_phrases([object_phrase(o, size=False, pattern=False) for o in objs])],
        "long_caption": " ".join(sentences),
        "sentences": sentences,
        "regions": _regions(rng, objs, cfg),
        "instance_mask": inst,
        "semantic_mask": semantic,
        "objects": objs,
        "label": ALL_SHAPES.index(largest["shape"]),
        "background": {"kind": kind, "tone": tone},
    }


def scene_record(scene: dict[str, Any]) -> dict[str, Any]:
    """The JSON side of a scene in the sample schema (what ``finegrain data synthesize`` writes)."""
    objects = [{k: v for k, v in o.items() if k != "named"} for o in scene["objects"]]
    return {
        "caption": scene["caption"],
        "captions": scene["captions"],
        "long_caption": scene["long_caption"],
        "sentences": scene["sentences"],
        "regions": scene["regions"],
        "label": scene["label"],
        "objects": objects,
        "background": scene["background"],
    }


def train_scene_seed(run_seed: int, index: int) -> int:
    """Seed of training scene ``index``; eval splits hash a different tag, so they never meet."""
    return mix_seed("synthetic-train", run_seed, index)
