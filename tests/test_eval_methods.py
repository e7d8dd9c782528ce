"""The evaluation suite on the library's own methods (FLAIR's text-conditioned scoring, GRAIN's
region fusion), built untrained from their smoke recipes: contracts, not accuracy."""

from __future__ import annotations

import pytest
import torch

from finegrain.eval import run_tasks
from finegrain.eval.common import EvalContext, chunked_scores, image_batches, tokenize
from finegrain.eval.config import EvalTaskConfig


def _method(recipe: str):
    from finegrain.methods.base import build_method
    from finegrain.recipes.base import get_recipe

    try:
        cfg = get_recipe(recipe)
    except ValueError as e:
        pytest.skip(f"recipe {recipe} unavailable: {e}")
    return build_method(cfg.method).eval(), cfg


@torch.no_grad()
def test_flair_chunked_scores_equal_method_score():
    m, cfg = _method("flair_smoke")
    assert m.has_conditioned_score
    from finegrain.eval.datasets import synthetic_split

    d = synthetic_split("sentences", 4, image_size=m.cfg.image.image_size)
    ctx = EvalContext.create(m, data_cfg=cfg.data, progress=False)
    images = next(image_batches(ctx, d["images"], 4, "x"))
    tokens = tokenize(ctx, d["texts"][:7])
    want = m.score(images, tokens)  # (4, 7)
    got = chunked_scores(
        ctx, m.image_features_for_scoring(images), m.text_features_for_scoring(tokens), budget_mb=0
    )  # 1 x 1 chunks
    assert torch.allclose(got, want, atol=1e-5)


def test_flair_and_grain_tasks_run():
    flair, _ = _method("flair_smoke")
    res = run_tasks(
        flair,
        [
            EvalTaskConfig(
                task="retrieval", variant="sentences", num_samples=6, scoring="rerank", rerank_k=2
            ),
            EvalTaskConfig(task="segmentation", num_samples=2, templates="plain"),
        ],
        progress=False,
    )
    assert 0 <= res["retrieval/synthetic/sentences+rerank+k2/image_retrieval_recall@5"] <= 1
    assert 0 <= res["segmentation/synthetic/miou"] <= 1
    grain, _ = _method("grain_smoke")
    assert grain.has_regions
    res = run_tasks(
        grain,
        [
            EvalTaskConfig(
                task="zeroshot",
                variant="novel",
                num_samples=6,
                templates="plain",
                descriptions="builtin",
                fusion_alpha=0.5,
            )
        ],
        progress=False,
    )
    assert 0 <= res["zeroshot/synthetic/novel+desc+alpha0.5/acc1"] <= 1
