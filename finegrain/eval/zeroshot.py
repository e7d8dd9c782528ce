"""Zero-shot classification: class names x templates (x class descriptions), top-1/top-5 and
mean per-class recall (CLIP_benchmark keys ``acc1``, ``acc5``, ``mean_per_class_recall``).

Class embedding (Radford et al. 2021, Sec. 3.1.4 prompt ensembling):
    w_c = normalize( mean_p normalize(f_text(prompt_{c,p})) ),   logits = normalize(f_img(x)) . w_c
(``class_vectors="renormalized"``, OpenCLIP). ``"mean"`` drops the outer normalize: GRAIN's
released eval (shaunak27/grain-clip ``our_eval.py``) and Menon & Vondrick's score averaging
(mean over descriptors of the cosine) both amount to it; ``"auto"`` (default) uses it with
descriptions or when the method sets ``zeroshot_class_vectors = "mean"`` (GRAIN).
With descriptions (GRAIN, Halbe et al. arXiv 2412.04429, Sec. 3.4; after Menon & Vondrick
2023) the prompts follow ``descriptor_prompts`` (``finegrain.eval.templates``).

Region-aware fusion (GRAIN Sec. 3.4), for methods with region queries r_q (q = 1..Q, normalised):
    s_c = alpha * <g, w_c> + (1 - alpha) * region_c
- ``region_score="released"`` (the released eval): region_c = mean_q max_d <r_q, e_d>, e_d the
  normalised embeddings of the class's raw descriptors (no template; without descriptions the
  class name is the only descriptor);
- ``"max_query"`` (finegrain's earlier formula): region_c = max_q <r_q, w_c>.

With ``scoring=conditioned`` (text-conditioned methods such as FLAIR) the image is scored
against every prompt with ``score_features`` and the class score is the mean over its prompts
(score ensembling, since a text-conditioned image embedding differs per prompt).
"""

from __future__ import annotations

import dataclasses

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
from finegrain.eval.long_text import text_policy
from finegrain.eval.templates import class_prompts, load_descriptions, load_templates


def task_descriptions(
    cfg: ZeroShotTaskConfig, classnames: list[str], builtin: dict[str, list[str]] | None = None
) -> dict[str, list[str]] | None:
    """The task's class descriptions (None without ``descriptions``). With
    ``missing_descriptions="name_only"`` (default) a class the descriptions lack (or whose
    list is empty) gets no entry: it is scored by its name alone and counted
    (``described_classes``); with ``"error"`` that is a one-line error naming the class."""
    if not cfg.descriptions:
        return None
    strict = getattr(cfg, "missing_descriptions", "name_only") == "error"
    loaded = load_descriptions(cfg.descriptions, builtin, classnames, allow_missing=not strict)
    if strict:
        return loaded
    return {c: ds for c in classnames if (ds := [d for d in loaded.get(c, []) if d.strip()])}


def without_descriptions(
    classnames: list[str], descriptions: dict[str, list[str]] | None
) -> list[str]:
    """The classes scored by their name alone although the task asked for descriptions."""
    return [] if descriptions is None else [c for c in classnames if c not in descriptions]


def prompts_for(
    cfg: ZeroShotTaskConfig, classnames: list[str], builtin: dict[str, list[str]] | None = None
) -> list[list[str]]:
    """Prompts per class from the task's template set and (optional) descriptions."""
    descriptions = task_descriptions(cfg, classnames, builtin)
    if cfg.templates == "cupl":  # CuPL sentences are complete prompts: no template around them
        from finegrain.eval.templates import check_descriptions, cupl_prompts

        cupl = cupl_prompts()
        check_descriptions(classnames, {c: cupl.get(c, []) for c in classnames})
        return [cupl[c] for c in classnames]
    templates = load_templates(cfg.templates, cfg.dataset)
    if descriptions is None or not without_descriptions(classnames, descriptions):
        return class_prompts(classnames, templates, descriptions, cfg.descriptor_prompts)
    return [  # classes without descriptions: the plain template prompts of their name
        class_prompts([c], templates, {c: descriptions[c]}, cfg.descriptor_prompts)[0]
        if c in descriptions
        else class_prompts([c], templates)[0]
        for c in classnames
    ]


def _owner(prompts: list[list[str]]) -> tuple[list[str], torch.Tensor]:
    flat = [p for ps in prompts for p in ps]
    owner = torch.tensor([c for c, ps in enumerate(prompts) for _ in ps])
    return flat, owner


def _prompt_embeddings(
    ctx: EvalContext, prompts: list[list[str]], batch_size: int, context_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, D) normalised embeddings of all prompts and (P,) their class index.

    Every prompt is encoded once; the result is cached on ``ctx`` (one ``run_tasks`` call, the
    method in eval mode and unchanged) per (method, prompts, context length), so tasks sharing
    classes and templates (e.g. the same dataset with two fusion settings) reuse it."""
    cache = ctx.__dict__.setdefault("_class_embedding_cache", {})
    key = (id(ctx.method), tuple(tuple(ps) for ps in prompts), context_length)
    if key in cache:
        return cache[key]
    flat, owner = _owner(prompts)
    emb = encode_texts(ctx, flat, ctx.method.encode_text, batch_size, context_length, "prompts")
    cache[key] = (F.normalize(emb.float(), dim=-1).cpu(), owner)
    return cache[key]


def class_embeddings(
    ctx: EvalContext,
    prompts: list[list[str]],
    batch_size: int,
    context_length: int = 0,
    renormalize: bool = True,
) -> torch.Tensor:
    """(C, D) mean of the normalised prompt embeddings of each class, renormalised or not."""
    emb, owner = _prompt_embeddings(ctx, prompts, batch_size, context_length)  # (P, D)
    summed = torch.zeros(len(prompts), emb.shape[1]).index_add_(0, owner, emb)  # (C, D)
    if renormalize:
        return F.normalize(summed, dim=-1)
    return summed / torch.bincount(owner, minlength=len(prompts)).float()[:, None]


def region_scores(region: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """ "max_query": (N, C) = max over region queries q of <r_q, w_c>; region (N, Q, D)."""
    return torch.einsum("nqd,cd->nqc", region, classes).amax(1)


def released_region_scores(
    region: torch.Tensor, descriptors: torch.Tensor, owner: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """ "released": (N, C) = mean over queries q of max over the class's descriptors d of
    <r_q, e_d>; region (N, Q, D) normalised, descriptors (P, D) normalised, owner (P,)."""
    sim = torch.einsum("nqd,pd->nqp", region, descriptors)  # (N, Q, P)
    out = torch.full((*sim.shape[:2], num_classes), float("-inf"))  # (N, Q, C)
    out = out.scatter_reduce(2, owner.expand_as(sim), sim, reduce="amax")
    return out.mean(1)


def renormalize_classes(cfg: ZeroShotTaskConfig, method: object) -> bool:
    """Whether the class vector is renormalised (``class_vectors``, module docstring)."""
    if cfg.class_vectors != "auto":
        return cfg.class_vectors == "renormalized"
    mean = bool(cfg.descriptions) or method.zeroshot_class_vectors == "mean"
    return not mean


@torch.no_grad()
def zeroshot_logits(
    ctx: EvalContext,
    cfg: ZeroShotTaskConfig,
    data: ClassificationData,
    prompts: list[list[str]],
    descriptors: list[list[str]] | None = None,
) -> torch.Tensor:
    """(N, C) class scores for every image; ``descriptors`` (raw, per class) feed the released
    region score (default: each class's name)."""
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
    renorm = renormalize_classes(cfg, m)
    classes = class_embeddings(ctx, prompts, bs, cfg.context_length, renorm)  # (C, D)
    img = F.normalize(encode_images(ctx, data.images, m.encode_image, bs).float().cpu(), dim=-1)
    logits = img @ classes.t()  # (N, C)
    if cfg.fusion_alpha < 1.0:
        region = encode_images(ctx, data.images, m.region_embeddings, bs, "regions")
        region = F.normalize(region.float().cpu(), dim=-1)  # (N, Q, D)
        if cfg.region_score == "released":
            raw = descriptors or [[c] for c in data.classnames]
            emb, owner = _prompt_embeddings(ctx, raw, bs, cfg.context_length)  # (P, D)
            reg = released_region_scores(region, emb, owner, len(raw))
        else:
            reg = region_scores(region, classes)
        a = cfg.fusion_alpha
        logits = a * logits + (1 - a) * reg
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
    desc = task_descriptions(cfg, data.classnames, data.descriptions)
    raw = [[d for d in desc.get(c, [c]) if d.strip()] for c in data.classnames] if desc else None
    texts = [p for ps in prompts for p in ps]
    with text_policy(ctx, cfg, texts) as (length, text_info):
        run_cfg = dataclasses.replace(cfg, context_length=length)
        logits = zeroshot_logits(ctx, run_cfg, data, prompts, raw)
    labels = torch.tensor(data.labels)
    protocol = {"n_prompts": len(texts), **text_info}  # counts/chance: finegrain.eval.protocol
    metrics = classification_metrics(logits, labels)
    if desc is not None:
        names_only = without_descriptions(data.classnames, desc)
        protocol["classes_without_descriptions"] = names_only
        metrics["classes_without_descriptions"] = float(len(names_only))
    art = {"logits": logits, "labels": labels, "protocol": protocol}
    return metrics, art
