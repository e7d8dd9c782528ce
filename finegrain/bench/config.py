"""The benchmark's one shared budget and how each registered method's run is derived from it.

Every method gets the same data (built-in synthetic scenes, same seed), batch, steps, learning
rate schedule, image size, embedding size and towers: the *hybrid* image tower
(``finegrain.encoders.hybrid``: the ImageNet-pretrained EfficientNet-Lite0 shipped on PyPI up to
output stride ``patch_size``, frozen, its output cached once per run for every method, and a
small trainable transformer with a class token over its feature-map tokens: a 128 px scene is an
8 x 8 token grid), so every method, including those that need token subsets, masks or attention
(CLIPpy, DetailCLIP), trains on the same tower; and one tiny text transformer from scratch.
Method-specific hyper-parameters (FLAIR's sub-captions, GRAIN's decoder, ...) come from the
method's ``<name>_smoke`` recipe, else from its config defaults. Nothing here is tuned per method
on the evaluation splits: the budget is set once, for all methods (see README, "finegrain demo").
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finegrain.data.config import DataConfig, SyntheticConfig
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.eval.config import EvalConfig
from finegrain.registry import METHODS, RECIPES

# A method that trains on augmented views (DetailCLIP) cuts them from the shared tower's cached
# bottom (``views="tokens"``: random resized crops of the feature map, no photometric jitter)
# instead of re-running the bottom on pixel crops (``"pixels"``, released): measured
# 2026-12-07, one thread, bottom cached, DetailCLIP's pixel views cost 3.1 CPU s per step of 64
# (the bottom on 128 fresh crops), token views 1.5 (CLIP 0.55 on the same machine), and on
# pixel views it did not learn at this budget (clip_loss ~3.9 vs CLIP's ~2.6; docs/demo)
CACHED_VIEWS = "tokens"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_GRID = 4  # tokens per side: DetailCLIP removes 2 x 2 blocks, so at least 4 x 4


PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that supports it, or a CPU whose
    flags (Linux ``/proc/cpuinfo``) include AVX512-BF16 or AMX-BF16. Elsewhere bf16 is
    emulated and slower than fp32."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: str) -> str:
    """The budget's ``precision`` as the trainer takes it (``auto`` decided for ``device``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got '{precision}'")
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


@dataclass(frozen=True)
class Budget:
    """What every method of one benchmark run shares (documented in the report)."""

    # CLIP on the hybrid tower at 200 / 300 / 400 steps of 64 (256 scenes per task, 2026-12-07):
    # shape top-1 65 / 87 / 95, caption T2I R@1 21 / 33 / 39 (README "finegrain demo")
    steps: int = 300
    batch_size: int = 64
    image_size: int = 128
    lr: float = 2e-3  # linear warmup over the first 10% of steps, then cosine to 0
    weight_decay: float = 0.1
    embed_dim: int = 64
    patch_size: int = 16  # the hybrid bottom's output stride: 128 px -> 8 x 8 tokens
    image_width: int = 128  # the hybrid tower's trainable transformer
    image_depth: int = 3
    image_heads: int = 4
    text_width: int = 64
    text_depth: int = 2
    text_heads: int = 2
    context_length: int = 64  # long captions of 4 objects need ~60 tokens
    train_scenes: int = 2048
    # the training scenes' seed: -1 = training seed s renders its own scenes (scene seed s; the
    # committed reports); >= 0 = every training seed trains on the same scenes and varies only
    # initialisation, batch order and views, as a paper's seeds share its one dataset. Measured
    # 2026-12-07 on a validation split (clip, grain, clippy x 3 seeds, full tier): one shared set
    # of 12288 scenes did not narrow the spread over seeds (mean per-metric seed sd 3.3 points vs
    # 3.1 with 4096 scenes per seed; claims' median half-width 4.8 vs 5.2): the spread is the
    # training's own, not the scenes' draw
    data_seed: int = -1
    # per evaluation task: 256 scenes (chance 0.4% on caption retrieval, the scale the learning
    # bars of issue 26 were set at); the claims' median half-width stays ~2 points (report)
    eval_images: int = 256
    probe_train: int = 64  # the linear probe's training scenes (30 epochs each)
    # training scenes that are spurious-correlation scenes (background tone predicts the class
    # in 95% of them; finegrain.data.synthetic_spurious): the same for every method
    spurious_share: float = 0.125
    # images of each region-level task (regions/*, hardneg/*, compositional/*; at most
    # eval_images): ~2.5 boxes per image, each box cropped and encoded per method
    region_images: int = 128
    device: str = "cpu"
    # training autocast: fp32 | bf16 | auto (bf16 where the hardware computes it natively,
    # resolve_precision); fp32 here, the precision every committed scenes report was run at.
    # bf16 buys little on these small towers: 1.19x training steps/s (CLIP and SigLIP 81 -> 68 s
    # at the default budget, 2-core AMD EPYC with AVX512-BF16, 2026-12-07), vs 1.77x on Flickr8k
    precision: str = "fp32"

    @property
    def warmup_steps(self) -> int:
        return self.steps // 10

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def scene_seed(self, seed: int) -> int:
        """The seed of the training scenes of training seed ``seed``."""
        return seed if self.data_seed < 0 else self.data_seed

    def describe(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "warmup_steps": self.warmup_steps,
                "token_grid": f"{self.grid}x{self.grid}"}  # fmt: skip


# ``--quick``: a smoke of the whole pipeline (every method, task, claim, figure), not a result;
# about a minute of CPU (the test suite runs it once)
QUICK = Budget(steps=10, batch_size=8, train_scenes=256, eval_images=16, probe_train=16)
# ``--full``: the tier that gives the claims a verdict: 3 seeds of twice the default training
# (600 steps) on twice the scenes, with four times the evaluation images (<= 60 min on 2 CPU
# cores by the estimate; minutes on a GPU). At 300 steps the seeds had not converged (shape
# top-1 of one method 15-69 across seeds, docs/benchmark 2026-12-07): the seed term, not the
# images, set the claims' intervals (median half-width 3.4 at 600 steps too). Seeds narrow
# them: 12 seeds of this budget, trained in four ``--seed-start`` parts and pooled with
# ``--merge``, give 1.90; 16 seeds in five parts 1.91 (docs/benchmark/pooled16, 2026-12-08)
FULL = Budget(steps=600, train_scenes=4096, eval_images=1024, probe_train=128,
              region_images=512)  # fmt: skip
FULL_SEEDS = 3


def budget_with(base: Any, changes: dict[str, Any], pairs: list[str] | None = None) -> Any:
    """``base`` (a frozen budget dataclass) with the CLI's named options ``changes`` (None =
    not given) and ``--budget key=value`` ``pairs`` applied; an unknown key or a value of the
    wrong type raises one line naming the valid keys."""
    fields = {f.name for f in dataclasses.fields(base)}
    named = {k: v for k, v in changes.items() if v is not None}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ValueError(f"--budget {pair}: expected key=value with key one of "
                             f"{', '.join(sorted(fields))}")  # fmt: skip
        default = getattr(base, key)
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                value: Any = raw.lower() in ("true", "1")
            else:
                value = type(default)(raw)
        except ValueError:
            raise ValueError(f"--budget {pair}: {key} takes a {type(default).__name__}, "
                             f"got '{raw}'") from None  # fmt: skip
        named[key] = value
    return dataclasses.replace(base, **named)


def methods_to_run(requested: str | None) -> list[str]:
    """finegrain's registered methods in registry order, or the comma-separated ``requested``
    ones (any registered method);
    an unknown name raises one line naming the valid ones."""
    valid = METHODS.names()
    if not requested:  # finegrain's own methods (not ones a test or a plugin registered)
        return [n for n in valid if METHODS.get(n).__module__.startswith("finegrain.")
                and METHODS.get(n).in_default_benchmark]  # fmt: skip
    names = [n.strip() for n in requested.split(",") if n.strip()]
    for n in names:
        if n not in valid:
            METHODS.get(n)  # ValueError: unknown method 'x' (did you mean ...); valid choices: ...
    if len(set(names)) != len(names):
        raise ValueError(f"--methods lists a method twice: {requested}")
    return names


def check_budget(b: Budget) -> None:
    """One-line ValueError for a budget the towers or the trainer cannot take."""
    if b.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {b.steps}")
    p, low = b.patch_size, MIN_GRID * b.patch_size
    if b.image_size % p:
        raise ValueError(
            f"--image-size {b.image_size} is not a multiple of {p} (the image tower's token "
            f"size); valid sizes: {low}, {low + p}, {low + 2 * p}, ... (multiples of {p}, >= {low})"
        )
    if b.image_size < low:
        raise ValueError(f"--image-size {b.image_size} is below {low} (a token grid under "
                         f"{MIN_GRID} x {MIN_GRID})")  # fmt: skip
    import torch

    if b.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got '{b.device}'")
    if b.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {b.device}: CUDA is not available on this machine; use cpu")
    if b.batch_size < 2:
        raise ValueError(f"batch size must be >= 2 for a contrastive loss, got {b.batch_size}")


def shared_towers(b: Budget) -> tuple[ImageTowerConfig, TextTowerConfig]:
    image = ImageTowerConfig(name="hybrid", pretrained="package", image_size=b.image_size,
                             patch_size=b.patch_size, width=b.image_width, depth=b.image_depth,
                             heads=b.image_heads)  # fmt: skip
    text = TextTowerConfig(name="transformer", context_length=b.context_length,
                           width=b.text_width, depth=b.text_depth, heads=b.text_heads)  # fmt: skip
    return image, text


def _base_run(name: str) -> Any:
    """The method's ``<name>_smoke`` recipe, else a run of its config defaults."""
    from finegrain.recipes.base import get_recipe

    if f"{name}_smoke" in RECIPES:
        return get_recipe(f"{name}_smoke")
    from finegrain.recipes.base import method_config

    cfg = get_recipe("clip_smoke")
    cfg.method = method_config(name, embed_dim=cfg.method.embed_dim,
                               image=cfg.method.image, text=cfg.method.text)  # fmt: skip
    return cfg


def run_config(name: str, b: Budget, seed: int, shared_image: bool = True) -> Any:
    """The RunConfig of method ``name`` under budget ``b`` and ``seed``.

    ``shared_image=False`` keeps the method's own (smoke) image tower at the budget's image
    size, for methods that cannot take a convolutional tower (token subsets, masks, attention).
    """
    cfg = copy.deepcopy(_base_run(name))
    image, text = shared_towers(b)
    m = cfg.method
    if not shared_image:
        image = dataclasses.replace(m.image, image_size=b.image_size)
    cfg.method = dataclasses.replace(m, image=image, text=text, embed_dim=b.embed_dim)
    if shared_image and "views" in {f.name for f in dataclasses.fields(cfg.method)}:
        cfg.method.views = CACHED_VIEWS  # a method's augmented views cut from the shared cache
    cfg.name, cfg.seed = f"demo_{name}", seed
    cfg.data = DataConfig(source="synthetic", batch_size=b.batch_size, image_size=b.image_size,
                          augment="none", mean=IMAGENET_MEAN, std=IMAGENET_STD, num_workers=0,
                          synthetic=SyntheticConfig(num_samples=b.train_scenes, seed=b.scene_seed(seed),
                                                    spurious_share=b.spurious_share))  # fmt: skip
    cfg.train = dataclasses.replace(
        cfg.train, steps=b.steps, lr=b.lr, min_lr=0.0, warmup_steps=b.warmup_steps,
        weight_decay=b.weight_decay, device=b.device, checkpoint_every=0, log_every=max(1, b.steps // 4),
        eval_every=0, progress=True, accum_steps=1,
        precision=resolve_precision(b.precision, b.device),
    )  # fmt: skip
    cfg.eval = EvalConfig(tasks=[])  # the benchmark evaluates itself (per-image results)
    return cfg
