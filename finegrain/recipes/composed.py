"""Composed recipes no paper defines (``finegrain.methods.composed``), as smoke twins.

- ``flair_grain_smoke``: FLAIR's K sub-captions with text-conditioned pooling (L_tcs, L_mps,
  each 1/2 as FLAIR) plus GRAIN's region queries, box and region-description losses;
- ``clippy_recon_smoke``: CLIPpy's max pooling with DetailCLIP's pixel reconstruction of the
  half of the patches the image tower does not see.

Both on the tiny ViT at 64 px and the built-in scenes (CPU, a few steps); the benchmark runs
them with ``finegrain demo --methods flair_grain,clippy_recon``.
"""

from __future__ import annotations

from finegrain.eval.config import EvalConfig, EvalTaskConfig
from finegrain.methods.composed import ClippyReconConfig, FlairGrainConfig
from finegrain.recipes.base import recipe, smoke_data, smoke_train, tiny_towers
from finegrain.run_config import RunConfig


def _tasks() -> list[EvalTaskConfig]:
    return [EvalTaskConfig(task="zeroshot", dataset="synthetic", num_samples=32)]


@recipe("flair_grain_smoke")
def flair_grain_smoke() -> RunConfig:
    """FLAIR's text-conditioned pooling + GRAIN's region queries, tiny ViT, synthetic scenes."""
    method = FlairGrainConfig(embed_dim=64, **tiny_towers(context_length=64))
    return RunConfig(name="flair_grain_smoke", method=method, data=smoke_data(),
                     train=smoke_train(steps=4), eval=EvalConfig(tasks=_tasks()))  # fmt: skip


@recipe("clippy_recon_smoke")
def clippy_recon_smoke() -> RunConfig:
    """CLIPpy's max pooling + DetailCLIP's pixel reconstruction, tiny ViT, synthetic scenes."""
    method = ClippyReconConfig(embed_dim=64, **tiny_towers(context_length=32))
    return RunConfig(name="clippy_recon_smoke", method=method, data=smoke_data(),
                     train=smoke_train(steps=4), eval=EvalConfig(tasks=_tasks()))  # fmt: skip
