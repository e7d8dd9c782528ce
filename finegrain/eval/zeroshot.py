"""Zero-shot classification: class names x templates (x class descriptions), top-1/top-5 and
mean per-class recall (CLIP_benchmark keys ``acc1``, ``acc5``, ``mean_per_class_recall``).

Class embedding (Radford et al. 2021, Sec. 3.1.4 prompt ensembling):
    w_c = normalize( mean_p normalize(f_text(prompt_{c,p})) ),   logits = f_img(x) . w_c
With descriptions (GRAIN, Halbe et al. arXiv 2412.04429, Sec. 3.4; after Menon & Vondrick
2023) the prompts are "{template(c)} which has {descriptor}" for every template x descriptor.

Region-aware fusion (GRAIN Sec. 3.4): for methods with region queries,
    s_c = alpha * <g, w_c> + (1 - alpha) * max_q <r_q, w_c>
where g is the global image embedding and r_q (q = 1..Q) the region-query embeddings: the
region score of a class is that of its best-matching region query.

With ``scoring=conditioned`` (text-conditioned methods such as FLAIR) the image is scored
against every prompt with ``score_features`` and the class score is the mean over its prompts
(score ensembling, since a text-conditioned image embedding differs per prompt).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finegrain.eval.common import (
    EvalContext,
    chunked_scores,
    encode_images,
    encode_texts,
    require,
)
from finegrain.eval.config import ZeroShotTaskConfig
from finegrain.eval.containers import ClassificationData
from finegrain.eval.templates import class_prompts, load_descriptions, load_templates


def prompts_for(
    cfg: ZeroShotTaskConfig, classnames: list[str], builtin: dict[str, list[str]] | None = None
) -> list[list[str]]:
    """Prompts per class from the task's template set and (optional) descriptions."""
    descriptions = load_descriptions(cfg.descriptions, builtin) if cfg.descriptions else None
    if cfg.templates == "cupl":  # CuPL sentences are complete prompts: no template around them
        from finegrain.eval.templates import check_descriptions, cupl_prompts

        cupl = cupl_prompts()
        check_descriptions(classnames, {c: cupl.get(c, []) for c in classnames})
        return [cupl[c] for c in classnames]
    return class_prompts(classnames, load_templates(cfg.templates, cfg.dataset), descriptions)


def _owner(prompts: list[list[str]]) -> tuple[list[str], torch.Tensor]:
    flat = [p for ps in prompts for p in ps]
    owner = torch.tensor([c for c, ps in enumerate(prompts) for _ in ps])
    return flat, owner


def class_embeddings(
    ctx: EvalContext, prompts: list[list[str]], batch_size: int, context_length: int = 0
) -> torch.Tensor:
    """(C, D) normalised mean of the normalised prompt embeddings of each class.

    Every prompt is encoded once; the result is cached on ``ctx`` (one ``run_tasks`` call, the
    method in eval mode and unchanged) per (method, prompts, context length), so tasks sharing
    classes and templates (e.g. the same dataset with two fusion settings) reuse it."""
    cache = ctx.__dict__.setdefault("_class_embedding_cache", {})
    key = (id(ctx.method), tuple(tuple(ps) for ps in prompts), context_length)
    if key in cache:
        return cache[key]
    flat, owner = _owner(prompts)
    emb = encode_texts(ctx, flat, ctx.method.encode_text, batch_size, context_length, "prompts")
    emb = F.normalize(emb.float(), dim=-1).cpu()  # (P, D)
    summed = torch.zeros(len(prompts), emb.shape[1]).index_add_(0, owner, emb)  # (C, D)
    cache[key] = F.normalize(summed, dim=-1)
    return cache[key]


def region_scores(region: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N, C) = max over region queries q of <r_q, w_c>; region (N, Q, D), classes (C, D)."""
    return torch.einsum("nqd,cd->nqc", region, classes).amax(1)


@torch.no_grad()
def zeroshot_logits(
    ctx: EvalContext, cfg: ZeroShotTaskConfig, data: ClassificationData, prompts: list[list[str]]
) -> torch.Tensor:
    """(N, C) class scores for every image."""
    m, bs, task = ctx.method, cfg.batch_size, f"zeroshot/{cfg.dataset}"
    if not 0.0 <= cfg.fusion_alpha <= 1.0:
        raise ValueError(f"fusion_alpha must lie in [0, 1], got {cfg.fusion_alpha}")
    if cfg.fusion_alpha < 1.0:
        require(m, "region_embeddings", f"{task} with fusion_alpha={cfg.fusion_alpha}")
    if cfg.scoring == "conditioned":
        require(m, "score_features", f"{task} with scoring=conditioned")
        if cfg.fusion_alpha < 1.0:
            raise ValueError("region fusion (fusion_alpha < 1) needs scoring=global")
        flat, owner = _owner(prompts)
        img_f = encode_images(ctx, data.images, m.image_features_for_scoring, bs)
        txt_f = encode_texts(ctx, flat, m.text_features_for_scoring, bs, cfg.context_length)
        s = chunked_scores(ctx, img_f, txt_f, cfg.memory_budget_mb)  # (N, P)
        summed = torch.zeros(s.shape[0], len(prompts)).index_add_(1, owner, s)
        return summed / torch.bincount(owner, minlength=len(prompts)).float()
    classes = class_embeddings(ctx, prompts, bs, cfg.context_length)  # (C, D)
    img = F.normalize(encode_images(ctx, data.images, m.encode_image, bs).float().cpu(), dim=-1)
    logits = img @ classes.t()  # (N, C)
    if cfg.fusion_alpha < 1.0:
        region = encode_images(ctx, data.images, m.region_embeddings, bs, "regions")
        region = F.normalize(region.float().cpu(), dim=-1)  # (N, Q, D)
        a = cfg.fusion_alpha
        logits = a * logits + (1 - a) * region_scores(region, classes)
    return logits


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 (top-min(5, C)) and the mean over present classes of per-class recall."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (N, k)
    hit = top == labels[:, None]
    pred = top[:, 0]
    recalls = [(pred[labels == c] == c).float().mean() for c in labels.unique()]
    return {
        "acc1": hit[:, 0].float().mean().item(),
        "acc5": hit.any(1).float().mean().item(),
        "mean_per_class_recall": torch.stack(recalls).mean().item(),
    }


def evaluate_zeroshot(
    ctx: EvalContext, cfg: ZeroShotTaskConfig, data: ClassificationData
) -> tuple[dict[str, float], dict]:
    prompts = prompts_for(cfg, data.classnames, data.descriptions)
    logits = zeroshot_logits(ctx, cfg, data, prompts)
    labels = torch.tensor(data.labels)
    return classification_metrics(logits, labels), {"logits": logits, "labels": labels}
