"""DetailCLIP recipes (Monsefi et al. 2024, arXiv 2409.06809; released ``JOB/run.sh`` / ``main.py``).

- ``detailclip_vitb16``: ViT-B/16 from scratch in the released ``MaskVisionTransformer``'s
  layout (timm's ViT: no pre-block LayerNorm, LayerNorm eps 1e-6, patch-embedding bias, timm's
  truncated-normal 0.02 init; frozen random patch embedding) + 12-layer 512-wide QuickGELU text
  transformer (OpenAI CLIP's, as the released ``Transformer``), embed dim 512, on YFCC15M-style
  webdataset shards (pass ``data.train=``); 16 GPUs x 256 = 4096 pairs per step, 50 epochs (the
  paper's Table 1-3 numbers; ``detailclip_vitb16_25ep`` is ``main.py``'s default 25); AdamW lr 5e-4,
  betas (0.9, 0.98), eps 1e-8, wd 0.5, 1 warm-up epoch then cosine to 1e-5; loss weights
  clip / iBOT patch / iBOT CLS / reconstruction = 1 / 1 / 1 / 1; keep ratio 0.5 (25 of 49 blocks);
  teacher patch temperature 0.04 for the first epoch, then 0.07. Differences: finegrain's warm-up
  starts at lr / warmup_steps instead of 1e-6, and precision is bf16 (released: fp16 AMP).
- ``detailclip_smoke``: tiny ViT at 32 px + tiny text transformer on the built-in scenes, CPU.
"""

from __future__ import annotations

import dataclasses

from finegrain.data.config import DataConfig, SyntheticConfig
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.eval.config import EvalConfig
from finegrain.recipes.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RunConfig,
    method_config,
    recipe,
    steps_for_epochs,
    vitb16_towers,
)
from finegrain.recipes.clip import synthetic_tasks
from finegrain.run_config import TrainConfig

YFCC15M_SAMPLES = 15_388_848  # SLIP's YFCC15M subset (Mu et al. 2022), as A-CLIP / DetailCLIP
GPUS, PER_GPU = 16, 256
# the released image tower's layout (timm VisionTransformer via ``mask_vit_base_patch16_224``)
RELEASED_IMAGE_LAYOUT = dict(ln_pre=False, norm_eps=1e-6, patch_bias=True, init="timm")


def _vitb16(epochs: int) -> RunConfig:
    steps_per_epoch = steps_for_epochs(YFCC15M_SAMPLES, 1, GPUS * PER_GPU)
    data = DataConfig(source="wds", batch_size=PER_GPU, image_size=224, num_workers=10,
                      augment="none", caption_key="txt", mean=IMAGENET_MEAN, std=IMAGENET_STD)  # fmt: skip
    train = TrainConfig(
        steps=epochs * steps_per_epoch, lr=5e-4, min_lr=1e-5, warmup_steps=steps_per_epoch,
        weight_decay=0.5, betas=(0.9, 0.98), eps=1e-8, grad_clip=0.0, precision="bf16",
        checkpoint_every=2000, log_every=100, eval_every=steps_per_epoch,
    )  # fmt: skip
    towers = vitb16_towers()
    # the released MaskVisionTransformer is timm's ViT (no ln_pre, LayerNorm eps 1e-6, patch
    # bias, timm's init) and its text transformer OpenAI CLIP's (QuickGELU)
    towers["image"] = dataclasses.replace(towers["image"], **RELEASED_IMAGE_LAYOUT)
    towers["text"] = dataclasses.replace(towers["text"], activation="quick_gelu")
    method = method_config(
        "detailclip", embed_dim=512, **towers, freeze_patch_embed=True,
        teacher_temp_warmup_steps=steps_per_epoch, keep_ratio=0.5,
        clip_weight=1.0, ibot_patch_weight=1.0, ibot_cls_weight=1.0, recon_weight=1.0,
    )  # fmt: skip
    return RunConfig(name="detailclip_vitb16", method=method, data=data, train=train,
                     eval=EvalConfig(tasks=synthetic_tasks(1024)))  # fmt: skip


@recipe("detailclip_vitb16")
def detailclip_vitb16() -> RunConfig:
    """DetailCLIP ViT-B/16 from scratch on YFCC15M shards, 16 x 256, 50 epochs (pass data.train=)."""
    return _vitb16(50)


@recipe("detailclip_vitb16_25ep")
def detailclip_vitb16_25ep() -> RunConfig:
    """DetailCLIP ViT-B/16 as detailclip_vitb16 but 25 epochs (the released main.py default)."""
    cfg = _vitb16(25)
    cfg.name = "detailclip_vitb16_25ep"
    return cfg


def smoke_config(method: str = "detailclip", steps: int = 20) -> RunConfig:
    """The tiny setting of the smoke twin, for DetailCLIP or (``method="clip"``) its baseline."""
    towers = {
        "image": ImageTowerConfig(name="vit", image_size=32, patch_size=4, width=64, depth=2,
                                  heads=2),
        "text": TextTowerConfig(name="transformer", context_length=32, width=64, depth=2, heads=2),
    }  # fmt: skip
    extra = {}
    if method == "detailclip":
        extra = dict(ibot_out_dim=256, ibot_hidden_dim=128, ibot_bottleneck_dim=64,
                     decoder_heads=4, teacher_temp_warmup_steps=max(1, steps // 10))  # fmt: skip
    data = DataConfig(source="synthetic", batch_size=16, image_size=32, augment="none",
                      synthetic=SyntheticConfig(num_samples=512))  # fmt: skip
    train = TrainConfig(steps=steps, lr=1e-3, min_lr=1e-5, warmup_steps=max(1, steps // 10),
                        weight_decay=0.05, device="cpu", checkpoint_every=10, log_every=5,
                        progress=False)  # fmt: skip
    return RunConfig(name=f"{method}_smoke", method=method_config(method, embed_dim=64, **towers,
                     **extra), data=data, train=train,
                     eval=EvalConfig(tasks=synthetic_tasks(32, fine=False)))  # fmt: skip


@recipe("detailclip_smoke")
def detailclip_smoke() -> RunConfig:
    """Smoke twin of detailclip_vitb16: tiny ViT at 32 px (8x8 patches) + tiny text, synthetic, CPU."""
    return smoke_config("detailclip")


__all__ = ["RELEASED_IMAGE_LAYOUT", "smoke_config"]
