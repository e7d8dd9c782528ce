"""FLAIR recipes (Xiao et al., CVPR 2025, arXiv 2412.03561; released ``train_cc3m_slurm.sh``).

- ``flair_vitb16``: the paper's CC3M setup: ViT-B/16 + 12-layer text transformer, embed 512,
  K = 8 sub-captions of 1..3 sentences from pre-split MLLM captions (webdataset given with
  ``data.train=``), lr 5e-4, 2000 warmup steps, AdamW (0.9, 0.98), eps 1e-8, wd 0.5, batch 128
  per GPU, 32 epochs, AMP (bf16 here; the released script uses fp16 ``amp``).
- ``flair_smoke``: tiny native ViT at 64 px on the built-in synthetic scenes, CPU, a few steps.
  Caption pool ``SCENE_FIELDS``: the scenes' alt-text, short caption and long-caption sentences,
  the analogue of the released mix (alt-text + short + long MLLM captions); the benchmark
  (``finegrain demo``) takes it from here. Sentences alone never show the model the short
  captions and class prompts the scenes are evaluated with (docs/flair_scenes.md).
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
from finegrain.eval.config import EvalConfig, EvalTaskConfig, RetrievalTaskConfig
from finegrain.methods.flair import DREAMLIP_FIELDS, FLAIRConfig
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
from finegrain.recipes.clip import clip_flickr8k, clip_flickr8k_smoke
from finegrain.run_config import TrainConfig

# The paper's CC3M-recap run: 32 epochs at 8 GPUs x 128 (2 nodes x 4).
PAPER_EPOCHS = 32
PAPER_GPUS = 8

__all__ = ["CC3M_RECAP_SAMPLES", "steps_for_epochs"]


def _retrieval_tasks(
    dataset: str, variant: str, num_samples: int = 256, path: str = ""
) -> list[EvalTaskConfig]:
    return [
        RetrievalTaskConfig(
            dataset=dataset,
            variant=variant,
            path=path,
            num_samples=num_samples,
            scoring=scoring,
        )
        for scoring in ("global", "conditioned")
    ]


@recipe("flair_vitb16")
def flair_vitb16() -> RunConfig:
    """FLAIR ViT-B/16 on CC3M-recap-style shards (paper setup; pass data.train=)."""
    method = FLAIRConfig(
        embed_dim=512,
        **vitb16_towers(),
        num_subcaptions=8,
        max_sentences=3,
        pool_heads=8,
        caption_fields=list(DREAMLIP_FIELDS),
        logit_bias_init="fixed",  # released b = -10 (near the prior of 1k x 8 texts)
    )
    data = DataConfig(
        source="wds",
        batch_size=128,
        image_size=224,
        augment="rrc",
        crop_scale=(0.9, 1.0),
        num_workers=8,
    )
    train = TrainConfig(
        steps=steps_for_epochs(CC3M_RECAP_SAMPLES, PAPER_EPOCHS, data.batch_size * PAPER_GPUS),
        lr=5e-4,
        warmup_steps=2000,
        betas=(0.9, 0.98),
        eps=1e-8,
        weight_decay=0.5,
        precision="bf16",
        checkpoint_every=2000,
        log_every=100,
    )
    evals = EvalConfig(tasks=_retrieval_tasks("synthetic", "sentences"))
    return RunConfig(name="flair_vitb16", method=method, data=data, train=train, eval=evals)


# the scenes' counterpart of DREAMLIP_FIELDS: alt-text, short caption, long caption's sentences
SCENE_FIELDS = ("caption", "captions", "sentences")


@recipe("flair_smoke")
def flair_smoke() -> RunConfig:
    """FLAIR, tiny ViT at 64 px on the built-in synthetic scenes, CPU, a few steps."""
    method = FLAIRConfig(
        embed_dim=64,
        **tiny_towers(context_length=64),
        num_subcaptions=4,
        max_sentences=2,
        pool_heads=4,
        caption_fields=list(SCENE_FIELDS),
    )
    evals = EvalConfig(tasks=_retrieval_tasks("synthetic", "sentences", num_samples=32))
    return RunConfig(
        name="flair_smoke",
        method=method,
        data=smoke_data(),
        train=smoke_train(steps=4),
        eval=evals,
    )


def _flair_from_clip(base: RunConfig, name: str) -> RunConfig:
    """``base`` (a CLIP run) with the method swapped to FLAIR on the same towers, data and
    budget; the caption pool is the sample's ``captions`` list; retrieval tasks gain a
    text-conditioned twin."""
    m = base.method
    heads = 8 if m.embed_dim % 8 == 0 else 4 if m.embed_dim % 4 == 0 else 1
    # The pool is 5 complete human captions (not MLLM sentences): K = 4 draws of 1..2 captions
    # keep the text-tower cost at 4x CLIP's and two merged captions inside MiniLM's 40 tokens.
    method = FLAIRConfig(
        image=m.image,
        text=m.text,
        embed_dim=m.embed_dim,
        num_subcaptions=4,
        max_sentences=2,
        caption_source="captions",
        pool_heads=heads,
    )
    tasks = list(base.eval.tasks)
    for t in base.eval.tasks:
        if isinstance(t, RetrievalTaskConfig) and t.scoring == "global":
            tasks.append(dataclasses.replace(t, scoring="conditioned", name=""))
    return dataclasses.replace(base, name=name, method=method, eval=EvalConfig(tasks=tasks))


@recipe("flair_flickr8k")
def flair_flickr8k() -> RunConfig:
    """FLAIR with clip_flickr8k's towers, data and budget (5 human captions as sub-caption pool)."""
    return _flair_from_clip(clip_flickr8k(), "flair_flickr8k")


@recipe("flair_flickr8k_smoke")
def flair_flickr8k_smoke() -> RunConfig:
    """Smoke twin of flair_flickr8k (clip_flickr8k_smoke with the method swapped)."""
    return _flair_from_clip(clip_flickr8k_smoke(), "flair_flickr8k_smoke")
