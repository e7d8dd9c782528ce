"""FLAIR recipes (Xiao et al., CVPR 2025, arXiv 2412.03561; released ``train_cc3m_slurm.sh``).

- ``flair_vitb16``: the paper's CC3M setup: ViT-B/16 + 12-layer text transformer, embed 512,
  K = 8 sub-captions of 1..3 sentences from pre-split MLLM captions (webdataset given with
  ``data.train=``), lr 5e-4, 2000 warmup steps, AdamW (0.9, 0.98), eps 1e-8, wd 0.5, batch 128
  per GPU, 32 epochs, AMP (bf16 here; the released script uses fp16 ``amp``).
- ``flair_smoke``: tiny native ViT at 64 px on the built-in synthetic scenes, CPU, a few steps.
- ``flair_flickr8k`` / ``flair_flickr8k_smoke``: the towers, data and budget of
  ``clip_flickr8k`` / ``clip_flickr8k_smoke`` (``finegrain.recipes.clip``) with the method
  swapped to FLAIR; Flickr8k's 5 human captions are the caption pool for sub-caption sampling
  (K = 4 sub-captions of 1..2 captions: the paper's K = 8 of 1..3 sentences would cost 8x the
  text tower of CLIP and overflow the 40-token MiniLM context).
  Retrieval is evaluated with global and with text-conditioned scoring.
"""

from __future__ import annotations

import dataclasses

from finegrain.data.config import DataConfig
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.eval.config import EvalConfig, EvalTaskConfig
from finegrain.methods.flair import FLAIRConfig
from finegrain.recipes.base import RunConfig, recipe, vitb16_towers
from finegrain.train.config import TrainConfig

# CC3M-recap as used by the paper: 2,823,019 samples, 32 epochs at 8 GPUs x 128 (2 nodes x 4).
CC3M_RECAP_SAMPLES = 2_823_019
PAPER_EPOCHS = 32
PAPER_GPUS = 8


def steps_for_epochs(num_samples: int, epochs: int, global_batch: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``num_samples`` at ``global_batch`` per step
    (the trainer counts steps; set ``train.steps`` from this for another dataset / GPU count)."""
    if min(num_samples, epochs, global_batch) < 1:
        raise ValueError("num_samples, epochs and global_batch must be >= 1")
    return epochs * (num_samples // global_batch)


def _retrieval_tasks(
    dataset: str, variant: str, num_samples: int = 256, path: str = ""
) -> list[EvalTaskConfig]:
    return [
        EvalTaskConfig(task="retrieval", dataset=dataset, variant=variant, path=path,
                       num_samples=num_samples, scoring=scoring)
        for scoring in ("global", "conditioned")
    ]  # fmt: skip


@recipe("flair_vitb16")
def flair_vitb16() -> RunConfig:
    """FLAIR ViT-B/16 on CC3M-recap-style shards (paper setup; pass data.train=)."""
    method = FLAIRConfig(
        embed_dim=512,
        **vitb16_towers(),
        num_subcaptions=8,
        max_sentences=3,
        pool_heads=8,
    )
    data = DataConfig(source="wds", batch_size=128, image_size=224, augment="rrc", crop_scale=(0.9, 1.0),
                      num_workers=8)  # fmt: skip
    train = TrainConfig(
        steps=steps_for_epochs(CC3M_RECAP_SAMPLES, PAPER_EPOCHS, data.batch_size * PAPER_GPUS),
        lr=5e-4, warmup_steps=2000, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.5,
        precision="bf16", checkpoint_every=2000, log_every=100,
    )  # fmt: skip
    evals = EvalConfig(tasks=_retrieval_tasks("synthetic", "sentences"))
    return RunConfig(name="flair_vitb16", method=method, data=data, train=train, eval=evals)


@recipe("flair_smoke")
def flair_smoke() -> RunConfig:
    """FLAIR, tiny ViT at 64 px on the built-in synthetic scenes, CPU, a few steps."""
    method = FLAIRConfig(
        embed_dim=64,
        image=ImageTowerConfig(name="vit", image_size=64, patch_size=8, width=64, depth=2, heads=2),
        text=TextTowerConfig(name="transformer", context_length=64, width=64, depth=2, heads=2),
        num_subcaptions=4,
        max_sentences=2,
        pool_heads=4,
    )
    data = DataConfig(source="synthetic", batch_size=16, image_size=64, augment="none")
    train = TrainConfig(steps=4, lr=1e-3, warmup_steps=1, weight_decay=0.1, device="cpu",
                        checkpoint_every=0, log_every=1, progress=False)  # fmt: skip
    evals = EvalConfig(tasks=_retrieval_tasks("synthetic", "sentences", num_samples=32))
    return RunConfig(name="flair_smoke", method=method, data=data, train=train, eval=evals)


def _flair_from_clip(base: RunConfig, name: str) -> RunConfig:
    """``base`` (a CLIP run) with the method swapped to FLAIR on the same towers, data and
    budget; the caption pool is the sample's ``captions`` list; retrieval tasks gain a
    text-conditioned twin."""
    m = base.method
    heads = 8 if m.embed_dim % 8 == 0 else 4 if m.embed_dim % 4 == 0 else 1
    # The pool is 5 complete human captions (not MLLM sentences): K = 4 draws of 1..2 captions
    # keep the text-tower cost at 4x CLIP's and two merged captions inside MiniLM's 40 tokens.
    method = FLAIRConfig(image=m.image, text=m.text, embed_dim=m.embed_dim, num_subcaptions=4,
                         max_sentences=2, caption_source="captions", pool_heads=heads)  # fmt: skip
    tasks = list(base.eval.tasks)
    for t in base.eval.tasks:
        if t.task == "retrieval" and t.scoring == "global":
            tasks.append(dataclasses.replace(t, scoring="conditioned", name=""))
    return dataclasses.replace(base, name=name, method=method, eval=EvalConfig(tasks=tasks))


def _clip_recipe(name: str) -> RunConfig:
    try:
        from finegrain.recipes import clip
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the CLIP recipes module
        raise ValueError(f"recipe '{name}' needs finegrain.recipes.clip ({e})") from None
    return getattr(clip, name)()


@recipe("flair_flickr8k")
def flair_flickr8k() -> RunConfig:
    """FLAIR with clip_flickr8k's towers, data and budget (5 human captions as sub-caption pool)."""
    return _flair_from_clip(_clip_recipe("clip_flickr8k"), "flair_flickr8k")


@recipe("flair_flickr8k_smoke")
def flair_flickr8k_smoke() -> RunConfig:
    """Smoke twin of flair_flickr8k (clip_flickr8k_smoke with the method swapped)."""
    return _flair_from_clip(_clip_recipe("clip_flickr8k_smoke"), "flair_flickr8k_smoke")
