"""GRAIN recipes (Halbe et al., arXiv 2412.04429; released ``train.py`` defaults).

- ``grain_vitb16``: the released ``CLIP_VITB16`` from scratch. Image tower: timm's
  ``vit_base_patch16_224`` with ``qk_norm=True`` (per-head q/k LayerNorm), i.e. LayerNorm eps
  1e-6 everywhere, no ``ln_pre``, patch embedding with bias, exact GELU, qkv bias: the native
  ``vit`` tower with ``qk_norm / norm_eps=1e-6 / ln_pre=False / patch_bias`` (the same function
  as timm's, tested; ``method.image.name=timm method.image.model=vit_base_patch16_224
  method.image.qk_norm=true`` gives timm's own module and parameter names). Text tower: OpenAI
  CLIP's 12-layer, 512-wide, 8-head transformer with QuickGELU. Embed 512, 5 region queries + 1
  global query, decoder 6 layers x 512 wide x 8 heads. Batch 128 per GPU on 2 nodes x 8 GPUs
  (README: "2*8 H100 GPUs") = 2,048 per step, AdamW lr 1e-3, wd 0.1, betas (0.9, 0.98), eps
  1e-8, 35 epochs with 1 warm-up epoch, cosine to 1e-5, steps computed for that global batch on
  CC3M (``steps_for_epochs``: the released DistributedSampler + drop_last gives the same 1,378
  steps per epoch); on another GPU count or dataset set ``train.steps`` /
  ``train.warmup_steps`` with ``steps_for_epochs``. bf16 (the released code uses fp16 AMP),
  squash resize as the released ``_transform(224)``, caption = alt-text or MLLM caption at
  random (``--is_gala``). Data: webdataset shards annotated by ``finegrain annotate``.
  Not reproduced: the released warm-up starts at 1e-6 (``--lr-start``), ours at lr/warmup;
  the released ViT blocks are re-created after timm's init and so keep PyTorch's default
  Linear init (ours: CLIP's init); the text MLP biases start at PyTorch's default (ours: 0).
- ``grain_smoke``: tiny native ViT at 64 px on the built-in synthetic scenes, CPU, a few steps,
  evaluated with name-only and description-aware zero-shot on the novel-concept split.
"""

from __future__ import annotations

from finegrain.data.config import DataConfig
from finegrain.eval.config import EvalConfig, EvalTaskConfig, ZeroShotTaskConfig
from finegrain.methods.grain import GRAINConfig
from finegrain.recipes.base import (
    CC3M_RECAP_SAMPLES,
    RunConfig,
    recipe,
    smoke_data,
    smoke_train,
    steps_for_epochs,
    tiny_towers,
    vitb16_towers,
)
from finegrain.run_config import TrainConfig

# The released code trains on CC3M / CC12M; CC3M-sized (3M) is the default scale.
PAPER_EPOCHS = 35
PAPER_WARMUP_EPOCHS = 1
PAPER_GPUS = 16  # 2 nodes x 8 GPUs (grain-clip README)
PAPER_BATCH_PER_GPU = 128

__all__ = ["steps_for_epochs"]


def zeroshot_tasks(num_samples: int = 256, fusion_alpha: float = 0.5) -> list[EvalTaskConfig]:
    """Novel-concept zero-shot: names only, with class descriptions, and with region fusion."""
    base = dict(dataset="synthetic", variant="novel", num_samples=num_samples)
    return [
        ZeroShotTaskConfig(**base, name="zeroshot/novel_names"),
        ZeroShotTaskConfig(**base, descriptions="builtin", name="zeroshot/novel_descriptions"),
        ZeroShotTaskConfig(
            **base,
            descriptions="builtin",
            fusion_alpha=fusion_alpha,
            name="zeroshot/novel_descriptions_fusion",
        ),
    ]


@recipe("grain_vitb16")
def grain_vitb16() -> RunConfig:
    """GRAIN ViT-B/16 from scratch on annotated shards (released setup; pass data.train=)."""
    towers = vitb16_towers()
    image, text = towers["image"], towers["text"]
    image.qk_norm, image.norm_eps, image.ln_pre, image.patch_bias = True, 1e-6, False, True
    text.activation = "quick_gelu"
    method = GRAINConfig(
        embed_dim=512,
        image=image,
        text=text,
        num_region_queries=5,
        decoder_width=512,
        decoder_depth=6,
        decoder_heads=8,
        caption="random",
    )
    data = DataConfig(
        source="wds",
        batch_size=PAPER_BATCH_PER_GPU,
        image_size=224,
        augment="squash",
        num_workers=8,
    )
    global_batch = data.batch_size * PAPER_GPUS  # 2,048
    train = TrainConfig(
        steps=steps_for_epochs(CC3M_RECAP_SAMPLES, PAPER_EPOCHS, global_batch),
        warmup_steps=steps_for_epochs(CC3M_RECAP_SAMPLES, PAPER_WARMUP_EPOCHS, global_batch),
        lr=1e-3,
        min_lr=1e-5,
        betas=(0.9, 0.98),
        eps=1e-8,
        weight_decay=0.1,
        precision="bf16",
        checkpoint_every=2000,
        log_every=100,
    )
    return RunConfig(
        name="grain_vitb16",
        method=method,
        data=data,
        train=train,
        eval=EvalConfig(tasks=zeroshot_tasks()),
    )


def grain_smoke_method() -> GRAINConfig:
    """The tiny GRAIN model of ``grain_smoke`` (also used by the tests and the benchmark)."""
    return GRAINConfig(
        embed_dim=64,
        **tiny_towers(context_length=32),
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
    return RunConfig(
        name="grain_smoke",
        method=grain_smoke_method(),
        data=smoke_data(),
        train=smoke_train(steps=4, min_lr=1e-5),
        eval=EvalConfig(tasks=zeroshot_tasks(num_samples=32)),
    )
