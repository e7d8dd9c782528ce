"""Spurious-correlation scenes: the built-in Waterbirds (Sagawa et al. 2020, the analysis CLIPpy
reports, Ranasinghe et al. ICCV 2023) in miniature.

Two object classes (``SPURIOUS_CLASSES``) and two saturated background tones
(``SPURIOUS_TONES``, used by no other scene): class k's own tone is ``SPURIOUS_TONES``' k-th.

- **Training** (``SyntheticConfig.spurious_share`` of the training scenes, picked by a hash of
  the run seed and the scene index, so every method trains on the same scenes): one medium
  object of a class drawn uniformly; its background has the class's own tone with probability
  ``spurious_correlation`` (default 0.95), else the other tone. Texts are the ordinary ones
  (the object named; the long caption's last sentence names the tone), so the tone predicts
  the class word in 95% of these scenes without any text saying so.
- **Test** (``eval_split("spurious", N)``): image i is in group ``i mod 4`` = (class, tone),
  so the four class x tone groups are balanced (exactly when 4 divides N); zero-shot over the
  two class names. A model that reads the tone instead of the shape fails the two groups where
  tone and class disagree: the *worst-group* accuracy (the minimum over the four groups of
  the group's accuracy) exposes it, the average accuracy hides it.
"""

from __future__ import annotations

import random
from typing import Any

from finegrain.data.config import SyntheticConfig
from finegrain.data.schema import mix_seed
from finegrain.data.synthetic import DESCRIPTIONS, generate_scene, train_scene_seed
from finegrain.data.synthetic_render import SPURIOUS_TONES

SPURIOUS_CLASSES = ("circle", "square")
TONES = tuple(SPURIOUS_TONES)  # TONES[k] is SPURIOUS_CLASSES[k]'s own tone
NUM_GROUPS = len(SPURIOUS_CLASSES) * len(TONES)
SIZE = "medium"  # the background covers most of the image: a tempting shortcut


def group_of(label: int, tone: int) -> int:
    """Group index of (class ``label``, tone index ``tone``): ``label * len(TONES) + tone``."""
    return label * len(TONES) + tone


def is_spurious(cfg: SyntheticConfig, index: int) -> bool:
    """Whether training scene ``index`` of a run is a spurious-correlation scene."""
    if not 0.0 <= cfg.spurious_share <= 1.0:
        raise ValueError(f"synthetic.spurious_share must be in [0, 1], got {cfg.spurious_share}")
    if cfg.spurious_share == 0.0:
        return False
    return random.Random(mix_seed("spurious-share", cfg.seed, index)).random() < cfg.spurious_share


def spurious_choice(cfg: SyntheticConfig, index: int) -> tuple[int, int]:
    """(class index, tone index) of spurious training scene ``index``."""
    if not 0.0 <= cfg.spurious_correlation <= 1.0:
        raise ValueError(
            f"synthetic.spurious_correlation must be in [0, 1], got {cfg.spurious_correlation}"
        )
    rng = random.Random(mix_seed("spurious-choice", cfg.seed, index))
    label = rng.randrange(len(SPURIOUS_CLASSES))
    own = rng.random() < cfg.spurious_correlation
    return label, label if own else (label + 1 + rng.randrange(len(TONES) - 1)) % len(TONES)


def spurious_scene(seed: int, image_size: int, label: int, tone: int) -> dict[str, Any]:
    """One object of class ``label`` on a background of tone ``tone`` (indices)."""
    spec = {"shape": SPURIOUS_CLASSES[label], "size": SIZE}
    cfg = SyntheticConfig(novel_object_prob=0.0)
    scene = generate_scene(seed, image_size, cfg=cfg, num_objects=1, objects=[spec],
                           background_tone=TONES[tone])  # fmt: skip
    scene["spurious"] = {"label": label, "tone": tone, "group": group_of(label, tone)}
    return scene


def training_scene(cfg: SyntheticConfig, index: int, image_size: int) -> dict[str, Any]:
    """Training scene ``index`` of a run: a spurious-correlation scene for the
    ``spurious_share`` of indices, else an ordinary scene (``generate_scene``)."""
    seed = train_scene_seed(cfg.seed, index)
    if is_spurious(cfg, index):
        return spurious_scene(seed, image_size, *spurious_choice(cfg, index))
    return generate_scene(seed, image_size, cfg=cfg)


def spurious_split(num: int, seed_of: Any, image_size: int) -> dict[str, Any]:
    """The balanced test split (module docstring); ``seed_of(i)`` seeds image i."""
    images, labels, tones, groups = [], [], [], []
    for i in range(num):
        g = i % NUM_GROUPS
        label, tone = divmod(g, len(TONES))
        images.append(spurious_scene(seed_of(i), image_size, label, tone)["image"])
        labels.append(label)
        tones.append(tone)
        groups.append(g)
    return {
        "images": images,
        "labels": labels,
        "tones": tones,
        "groups": groups,
        "classnames": list(SPURIOUS_CLASSES),
        "group_names": [f"{c} on {t}" for c in SPURIOUS_CLASSES for t in TONES],
        "descriptions": {c: list(DESCRIPTIONS[c]) for c in SPURIOUS_CLASSES},
    }
