"""Image-text retrieval: R@1/5/10, mean and median rank, in both directions.

Scoring modes (``RetrievalTaskConfig.scoring``):
- ``global``: cosine similarity of global embeddings (CLIP, SigLIP);
- ``conditioned``: ``Method.score_features`` on every image x text pair, in chunks that fit
  ``memory_budget_mb`` (FLAIR, Xiao et al. CVPR 2025, Sec. 3.3: the image embedding is
  pooled *for each text*, so the score matrix cannot be one matmul);
- ``rerank``: global similarity picks the top ``rerank_k`` candidates of each query, the
  conditioned score re-orders only those candidates (the rest keep their global order).

Protocol (as in CLIP_benchmark / Karpathy): text-to-image ("image retrieval") ranks the one
image of each text; image-to-text ("text retrieval") counts, for each image, the best-ranked
of its ground-truth texts. Ties are broken by index (a stable sort), never in the model's
favour. Recalls are fractions in [0, 1] like CLIP_benchmark's.
"""

from __future__ import annotations

import dataclasses

import torch

from finegrain.eval.common import (
    EvalContext,
    chunked_scores,
    encode_images,
    encode_texts,
    require,
    slice_features,
)
from finegrain.eval.config import RetrievalTaskConfig
from finegrain.eval.containers import RetrievalData
from finegrain.eval.long_text import text_policy

KS = (1, 5, 10)


def _ranks(scores: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """1-based rank of the best ground-truth column per row, ties broken by column index.

    scores: (R, C); gt: (R, C) bool with at least one True per row. Returns (R,) long.
    """
    assert gt.any(1).all(), "every query needs at least one ground-truth item"
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype)
    best = torch.where(gt, scores, neg_inf).max(1, keepdim=True).values  # (R, 1)
    idx = torch.arange(scores.shape[1])
    first = torch.where(gt & (scores == best), idx, scores.shape[1]).min(1, keepdim=True).values
    ahead = (scores > best) | ((scores == best) & (idx < first))  # (R, C)
    return ahead.sum(1) + 1


def retrieval_ranks(
    scores: torch.Tensor, text_to_image: torch.Tensor, rows_per_chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranks of texts' images among images (Nt,), ranks of images' best text (Ni,)).

    scores: (Ni, Nt), ``scores[i, t]`` = similarity of image i and text t.
    """
    ni, nt = scores.shape
    t2i, i2t = [], []
    for s in range(0, nt, rows_per_chunk):  # text queries over images
        cols = scores[:, s : s + rows_per_chunk].t()  # (n, Ni)
        gt = torch.zeros_like(cols, dtype=torch.bool)
        gt[torch.arange(cols.shape[0]), text_to_image[s : s + rows_per_chunk]] = True
        t2i.append(_ranks(cols, gt))
    for s in range(0, ni, rows_per_chunk):  # image queries over texts
        rows = scores[s : s + rows_per_chunk]  # (n, Nt)
        gt = text_to_image[None, :] == torch.arange(s, s + rows.shape[0])[:, None]
        i2t.append(_ranks(rows, gt))
    return torch.cat(t2i), torch.cat(i2t)


def rank_metrics(t2i: torch.Tensor, i2t: torch.Tensor) -> dict[str, float]:
    """CLIP_benchmark names: ``image_retrieval`` = text->image, ``text_retrieval`` = image->text."""
    out: dict[str, float] = {}
    for name, r in (("image_retrieval", t2i), ("text_retrieval", i2t)):
        for k in KS:
            out[f"{name}_recall@{k}"] = (r <= k).float().mean().item()
        out[f"{name}_mean_rank"] = r.float().mean().item()
        out[f"{name}_median_rank"] = r.float().median().item()
    return out


def rerank_key(global_s: torch.Tensor, cond_s: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Scores (float64) whose order is: candidates by conditioned score, then the rest by
    global score. ``cand`` (R, C) bool marks each query row's candidates."""
    g, c = global_s.double(), cond_s.double()
    finite_c = torch.where(cand, c, torch.zeros_like(c))
    offset = g.abs().max() + finite_c.abs().max() + 1.0
    return torch.where(cand, finite_c + 2 * offset, g)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(R, C) bool, True at each row's k highest scores."""
    k = min(k, scores.shape[1])
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, scores.topk(k, dim=1).indices, True)


@torch.no_grad()
def candidate_scores(
    ctx: EvalContext, img_f, txt_f, cand: torch.Tensor, img_chunk: int, budget_mb: int
) -> torch.Tensor:
    """Conditioned scores of the (image, text) pairs marked in ``cand`` (Ni, Nt); other
    entries are NaN. Images go in chunks; each chunk is scored against the union of texts
    any of its images needs, so work is ~ Ni * k instead of Ni * Nt."""
    ni, nt = cand.shape
    out = torch.full((ni, nt), float("nan"))
    for s in ctx.bar(range(0, ni, img_chunk), "rerank", total=-(-ni // img_chunk)):
        rows = slice(s, s + img_chunk)
        cols = cand[rows].any(0).nonzero().squeeze(1)  # (n,)
        if cols.numel() == 0:
            continue
        quiet = dataclasses.replace(ctx, progress=False)
        sub = chunked_scores(
            quiet, slice_features(img_f, rows), slice_features(txt_f, cols), budget_mb
        )  # (n_rows, n)
        out[rows][:, cols] = sub  # out[rows] is a view
    return out


def score_matrix(ctx: EvalContext, cfg: RetrievalTaskConfig, data: RetrievalData):
    """The (Ni, Nt) global and (when asked) conditioned scores, plus the rank-order keys for
    text->image (Ni, Nt) and image->text (Ni, Nt)."""
    m = ctx.method
    if cfg.scoring != "global":
        require(m, "score_features", f"retrieval/{cfg.dataset} with scoring={cfg.scoring}")
    bs, cl = cfg.batch_size, cfg.context_length
    g = None
    if cfg.scoring in ("global", "rerank"):
        img = encode_images(ctx, data.images, m.encode_image, bs, "images")
        txt = encode_texts(ctx, data.texts, m.encode_text, bs, cl, "texts")
        g = (img @ txt.t()).float().cpu()  # (Ni, Nt)
        if cfg.scoring == "global":
            return g, g, g
    img_f = encode_images(ctx, data.images, m.image_features_for_scoring, bs, "images (cond.)")
    txt_f = encode_texts(ctx, data.texts, m.text_features_for_scoring, bs, cl, "texts (cond.)")
    if cfg.scoring == "conditioned":
        c = chunked_scores(ctx, img_f, txt_f, cfg.memory_budget_mb)
        return c, c, c
    cand_t2i = topk_mask(g.t(), cfg.rerank_k).t()  # each text's k images, (Ni, Nt)
    cand_i2t = topk_mask(g, cfg.rerank_k)  # each image's k texts, (Ni, Nt)
    c = candidate_scores(ctx, img_f, txt_f, cand_t2i | cand_i2t, 32, cfg.memory_budget_mb)
    return c, rerank_key(g.t(), c.t(), cand_t2i.t()).t(), rerank_key(g, c, cand_i2t)


def evaluate_retrieval(
    ctx: EvalContext, cfg: RetrievalTaskConfig, data: RetrievalData
) -> tuple[dict[str, float], dict]:
    """Metrics and the artefacts plots need (scores, ranks, protocol: context length and
    truncation policy, ``finegrain.eval.long_text``)."""
    with text_policy(ctx, cfg, data.texts) as (length, text_info):
        run_cfg = dataclasses.replace(cfg, context_length=length)
        scores, key_t2i, key_i2t = score_matrix(ctx, run_cfg, data)
    owner = torch.tensor(data.text_to_image)
    t2i, _ = retrieval_ranks(key_t2i, owner)
    _, i2t = retrieval_ranks(key_i2t, owner)
    metrics = rank_metrics(t2i, i2t)
    # counts and chance recalls come from the data (finegrain.eval.protocol); the text policy
    # (context length, truncation, cut texts) only from here
    return metrics, {"scores": key_t2i, "t2i_ranks": t2i, "i2t_ranks": i2t, "protocol": text_info}
