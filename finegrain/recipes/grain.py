"""GRAIN recipes (Halbe et al., arXiv 2412.04429; released ``train.py`` defaults).

- ``grain_vitb16``: ViT-B/16 image tower and 12-layer text transformer from scratch, embed 512,
  5 region queries + 1 global query, decoder 6 layers x 512 wide x 8 heads, AdamW lr 1e-3,
  wd 0.1, betas (0.9, 0.98), eps 1e-8, 1 warmup epoch (in steps), cosine to 1e-5, batch 128
  per GPU, 35 epochs (CC3M-sized by default; set ``train.steps`` / ``train.warmup_steps`` for
  your shards with ``steps_for_epochs``), bf16 (the released code uses fp16 AMP), squash
  resize as the released ``_transform(224)``, caption = alt-text or MLLM caption at random
  (``--is_gala``). Data: webdataset shards annotated by ``finegrain annotate``.
- ``grain_smoke``: tiny native ViT at 64 px on the built-in synthetic scenes, CPU, a few steps,
  evaluated with name-only and description-aware zero-shot on the novel-concept split.
"""

from __future__ import annotations

from finegrain.data.config import DataConfig
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.eval.config import EvalConfig, EvalTaskConfig
from finegrain.methods.grain import GRAINConfig
from finegrain.recipes.base import RunConfig, recipe, vitb16_towers
from finegrain.train.config import TrainConfig

CC3M_SAMPLES = 2_823_019  # the released code trains on CC3M / CC12M; 3M is the default scale
PAPER_EPOCHS = 35
PAPER_GPUS = 8


def steps_for_epochs(num_samples: int, epochs: float, global_batch: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``num_samples`` at ``global_batch`` per step."""
    if min(num_samples, epochs, global_batch) <= 0:
        raise ValueError("num_samples, epochs and global_batch must be > 0")
    return max(1, int(epochs * (num_samples // global_batch)))


def zeroshot_tasks(num_samples: int = 256, fusion_alpha: float = 0.5) -> list[EvalTaskConfig]:
    """Novel-concept zero-shot: names only, with class descriptions, and with region fusion."""
    base = dict(task="zeroshot", dataset="synthetic", variant="novel", num_samples=num_samples)
    return [
        EvalTaskConfig(**base, name="zeroshot/novel_names"),
        EvalTaskConfig(**base, descriptions="builtin", name="zeroshot/novel_descriptions"),
        EvalTaskConfig(**base, descriptions="builtin", fusion_alpha=fusion_alpha,
                       name="zeroshot/novel_descriptions_fusion"),
    ]  # fmt: skip


@recipe("grain_vitb16")
def grain_vitb16() -> RunConfig:
    """GRAIN ViT-B/16 from scratch on annotated shards (released setup; pass data.train=)."""
    method = GRAINConfig(
        embed_dim=512,
        **vitb16_towers(),
        num_region_queries=5,
        decoder_width=512,
        decoder_depth=6,
        decoder_heads=8,
        caption="random",
    )
    data = DataConfig(source="wds", batch_size=128, image_size=224, augment="squash", num_workers=8)
    global_batch = data.batch_size * PAPER_GPUS
    train = TrainConfig(
        steps=steps_for_epochs(CC3M_SAMPLES, PAPER_EPOCHS, global_batch),
        warmup_steps=steps_for_epochs(CC3M_SAMPLES, 1, global_batch),
        lr=1e-3, min_lr=1e-5, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1,
        precision="bf16", checkpoint_every=2000, log_every=100,
    )  # fmt: skip
    return RunConfig(name="grain_vitb16", method=method, data=data, train=train,
                     eval=EvalConfig(tasks=zeroshot_tasks()))  # fmt: skip


def grain_smoke_method() -> GRAINConfig:
    """The tiny GRAIN model of ``grain_smoke`` (also used by the tests and the benchmark)."""
    return GRAINConfig(
        embed_dim=64,
        image=ImageTowerConfig(name="vit", image_size=64, patch_size=8, width=64, depth=2, heads=2),
        text=TextTowerConfig(name="transformer", context_length=32, width=64, depth=2, heads=2),
        num_region_queries=4,
        decoder_width=64,
        decoder_depth=2,
        decoder_heads=4,
        decoder_ffn_dim=128,
        decoder_dropout=0.0,
    )


@recipe("grain_smoke")
def grain_smoke() -> RunConfig:
    """GRAIN, tiny ViT at 64 px on the built-in synthetic scenes, CPU, a few steps."""
    data = DataConfig(source="synthetic", batch_size=16, image_size=64, augment="none")
    train = TrainConfig(steps=4, lr=1e-3, min_lr=1e-5, warmup_steps=1, weight_decay=0.1, device="cpu",
                        checkpoint_every=0, log_every=1, progress=False)  # fmt: skip
    return RunConfig(name="grain_smoke", method=grain_smoke_method(), data=data, train=train,
                     eval=EvalConfig(tasks=zeroshot_tasks(num_samples=32)))  # fmt: skip
