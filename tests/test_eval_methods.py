"""The evaluation suite on the library's own methods (FLAIR's text-conditioned scoring, GRAIN's
region fusion), built untrained from their smoke recipes: the reported metrics equal loops
written here over the methods' own embeddings and scores."""

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


def _rank(order_key: list[tuple], target: int) -> int:
    """1-based position of ``target`` in the indices sorted by ``order_key`` (ascending)."""
    order = sorted(range(len(order_key)), key=lambda i: order_key[i])
    return order.index(target) + 1


@torch.no_grad()
def test_flair_rerank_retrieval_against_loop():
    """FLAIR ``scoring=rerank``: each sentence's top-k images by global cosine are re-ordered by
    the text-conditioned score, the rest keep their global order; R@k computed by a loop."""
    from finegrain.eval.datasets import synthetic_split

    flair, cfg = _method("flair_smoke")
    task = EvalTaskConfig(
        task="retrieval", variant="sentences", num_samples=6, scoring="rerank", rerank_k=2
    )
    res = run_tasks(flair, [task], progress=False, data_cfg=cfg.data)
    d = synthetic_split("sentences", 6, image_size=flair.cfg.image.image_size)
    ctx = EvalContext.create(flair, data_cfg=cfg.data, progress=False)
    images = torch.cat(list(image_batches(ctx, d["images"], 64, "x")))
    tokens = tokenize(ctx, list(d["texts"]))
    g = flair.encode_image(images) @ flair.encode_text(tokens).t()  # (Ni, Nt)
    cond = flair.score(images, tokens)  # (Ni, Nt)
    ranks = []
    for t, owner in enumerate(d["text_to_image"]):
        col = g[:, t].tolist()
        top = sorted(range(len(col)), key=lambda i: (-col[i], i))[:2]  # the k candidates
        key = [(0, -float(cond[i, t]), i) if i in top else (1, -col[i], i) for i in range(len(col))]
        ranks.append(_rank(key, int(owner)))
    pre = "retrieval/synthetic/sentences+rerank+k2/image_retrieval_"
    for k in (1, 5):
        want = sum(r <= k for r in ranks) / len(ranks)
        assert res[f"{pre}recall@{k}"] == pytest.approx(want), k
    assert res[f"{pre}mean_rank"] == pytest.approx(sum(ranks) / len(ranks))


@torch.no_grad()
def test_grain_fusion_zeroshot_against_loop():
    """GRAIN description-aware zero-shot with region fusion (alpha 0.5, released scoring):
    top-1 from a loop over prompts, descriptors and region queries."""
    from finegrain.eval.datasets import synthetic_split
    from finegrain.eval.templates import description_prompts

    grain, cfg = _method("grain_smoke")
    assert grain.has_regions
    task = EvalTaskConfig(
        task="zeroshot", variant="novel", num_samples=12, templates="plain",
        descriptions="builtin", fusion_alpha=0.5,
    )  # fmt: skip
    res = run_tasks(grain, [task], progress=False, data_cfg=cfg.data)
    d = synthetic_split("novel", 12, image_size=grain.cfg.image.image_size)
    ctx = EvalContext.create(grain, data_cfg=cfg.data, progress=False)
    x = torch.cat(list(image_batches(ctx, d["images"], 64, "x")))
    g = torch.nn.functional.normalize(grain.encode_image(x), dim=-1)  # (N, E)
    regions = grain.region_embeddings(x)  # (N, Q, E), normalised

    def unit_text(texts: list[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(grain.encode_text(tokenize(ctx, texts)), dim=-1)

    names = list(d["classnames"])
    prompts = [description_prompts(c, [c], d["descriptions"][c]) for c in names]
    class_vecs = [unit_text(p).mean(0) for p in prompts]  # mean, not renormalised (released)
    raws = [unit_text(d["descriptions"][c]) for c in names]  # (P_c, E) the raw descriptors
    correct = 0
    for n, label in enumerate(d["labels"]):
        scores = []
        for vec, raw in zip(class_vecs, raws):
            region = sum(max(float(q @ e) for e in raw) for q in regions[n]) / len(regions[n])
            scores.append(0.5 * float(g[n] @ vec) + 0.5 * region)
        correct += max(range(len(scores)), key=lambda c: (scores[c], -c)) == int(label)
    got = res["zeroshot/synthetic/novel+desc+alpha0.5/acc1"]
    assert got == pytest.approx(correct / len(d["labels"]))


def test_flair_segmentation_task_runs():
    flair, _ = _method("flair_smoke")
    res = run_tasks(
        flair, [EvalTaskConfig(task="segmentation", num_samples=2, templates="plain")],
        progress=False,
    )  # fmt: skip
    assert 0 <= res["segmentation/synthetic/miou"] <= 1  # the values: test_eval_segmentation
