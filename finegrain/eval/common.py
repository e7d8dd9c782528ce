"""Shared evaluation plumbing: preprocessing, batched encoding, chunked (text-conditioned)
scoring under a memory budget, and capability checks on methods."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from finegrain.data.config import DataConfig
from finegrain.data.transforms import BoxTransform
from finegrain.eval.containers import ImageItem, load_image
from finegrain.methods.base import CAPABILITIES, Method


def eval_transform(image_size: int, mean: tuple, std: tuple, crop: bool = True) -> Callable:
    """PIL image -> (3, S, S) normalised tensor through the one evaluation transform
    (``finegrain.data.transforms.BoxTransform``): bicubic resize of the short side + centre
    crop (``crop``), or a squash to a square (segmentation, so masks stay aligned)."""
    tf = BoxTransform(size=image_size, mode="center" if crop else "squash", mean=mean, std=std)
    return lambda image: tf(image)[0]


@dataclass
class EvalContext:
    """What every task needs besides its config: the method, device and preprocessing."""

    method: Method
    device: torch.device
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    progress: bool = True

    @classmethod
    def create(
        cls,
        method: Method,
        device: str | torch.device = "cpu",
        data_cfg: DataConfig | None = None,
        progress: bool = True,
    ) -> EvalContext:
        d = data_cfg or DataConfig()
        return cls(method, torch.device(device), tuple(d.mean), tuple(d.std), progress)

    @property
    def image_size(self) -> int:
        return int(self.method.cfg.image.image_size)

    def bar(self, it: Any, desc: str, total: int | None = None) -> Any:
        return tqdm(it, desc=desc, total=total, disable=not self.progress, leave=False)


def image_batches(
    ctx: EvalContext,
    images: list[ImageItem],
    batch_size: int,
    desc: str,
    crop: bool = True,
    size: int = 0,
) -> Iterator[torch.Tensor]:
    """(B, 3, S, S) normalised batches on ``ctx.device``; S = ``size`` or the model's input
    size (a larger ``size`` gives dense tasks more patches at test time)."""
    tf = eval_transform(size or ctx.image_size, ctx.mean, ctx.std, crop)
    starts = range(0, len(images), batch_size)
    for s in ctx.bar(starts, desc, total=len(starts)):
        batch = torch.stack([tf(load_image(im)) for im in images[s : s + batch_size]])
        yield batch.to(ctx.device)


def _tower_tokenizer(method: Method) -> Any:
    """The text tower's tokenizer when it has a ``context_length`` (all finegrain towers)."""
    tower = method.towers().get("text")
    tok = None if tower is None else getattr(tower, "tokenizer", None)
    return tok if hasattr(tok, "context_length") else None


def tokenize(ctx: EvalContext, texts: list[str], context_length: int = 0) -> torch.Tensor:
    """Tokenise with the method's tokenizer. ``context_length > 0`` truncates every text to
    that many tokens (long-caption retrieval at 77 vs the model's own length, as Long-CLIP and
    FLAIR report): through ``tokenize(texts, context_length=...)`` when the method accepts it,
    else through a copy of its text tower's tokenizer, padded back to the tower's width."""
    m = ctx.method
    if context_length <= 0:
        return m.tokenize(texts)
    if "context_length" in inspect.signature(m.tokenize).parameters:
        return m.tokenize(texts, context_length=context_length)
    tok = _tower_tokenizer(m)
    if tok is None:
        raise ValueError(
            f"method '{m.cfg.name}' cannot tokenize to context_length={context_length}: its "
            "tokenize() takes no context_length and it has no text.tokenizer; use context_length=0"
        )
    native = int(tok.context_length)
    if context_length > native:
        raise ValueError(
            f"context_length={context_length} exceeds the {native} positions of method "
            f"'{m.cfg.name}'s text tower; use at most {native} (0 = the model's own)"
        )
    short = copy.copy(tok)
    short.context_length = context_length
    ids = short(texts)  # (N, context_length)
    pad = int(getattr(m.text, "pad_id", getattr(tok, "pad_id", 0)))
    return F.pad(ids, (0, native - ids.shape[1]), value=pad)  # (N, native)


@torch.no_grad()
def encode_texts(
    ctx: EvalContext,
    texts: list[str],
    fn: Callable,
    batch_size: int,
    context_length: int = 0,
    desc: str = "texts",
) -> Any:
    """``fn(tokens)`` over batches of ``texts``, concatenated along dim 0."""
    outs = []
    starts = range(0, len(texts), batch_size)
    for s in ctx.bar(starts, desc, total=len(starts)):
        tokens = tokenize(ctx, texts[s : s + batch_size], context_length).to(ctx.device)
        outs.append(fn(tokens))
    return cat_features(outs)


@torch.no_grad()
def encode_images(
    ctx: EvalContext,
    images: list[ImageItem],
    fn: Callable,
    batch_size: int,
    desc: str = "images",
    crop: bool = True,
) -> Any:
    return cat_features([fn(b) for b in image_batches(ctx, images, batch_size, desc, crop)])


# ---- feature pytrees: a Tensor, or a dict/list/tuple of them with a leading batch dim ------
def cat_features(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, 0)
    if isinstance(first, dict):
        return {k: cat_features([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(cat_features([p[i] for p in parts]) for i in range(len(first)))
    raise TypeError(f"cannot concatenate features of type {type(first).__name__}")


def slice_features(feats: Any, sl: slice | torch.Tensor) -> Any:
    if isinstance(feats, torch.Tensor):
        return feats[sl]
    if isinstance(feats, dict):
        return {k: slice_features(v, sl) for k, v in feats.items()}
    if isinstance(feats, (list, tuple)):
        return type(feats)(slice_features(v, sl) for v in feats)
    raise TypeError(f"cannot slice features of type {type(feats).__name__}")


def num_items(feats: Any) -> int:
    if isinstance(feats, torch.Tensor):
        return feats.shape[0]
    if isinstance(feats, dict):
        return num_items(next(iter(feats.values())))
    return num_items(feats[0])


def bytes_per_item(feats: Any) -> int:
    if isinstance(feats, torch.Tensor):
        return feats[0].numel() * feats.element_size() if feats.shape[0] else 0
    values = feats.values() if isinstance(feats, dict) else feats
    return sum(bytes_per_item(v) for v in values)


def chunk_sizes(n_img: int, n_txt: int, pair_bytes: int, budget_bytes: int) -> tuple[int, int]:
    """Images x texts per chunk so that ``ci * ct * pair_bytes <= budget`` (at least 1 x 1).
    Texts fill the chunk first (all texts when they fit), then images."""
    pairs = max(1, budget_bytes // max(1, pair_bytes))
    ct = max(1, min(n_txt, pairs))
    ci = max(1, min(n_img, pairs // ct))
    return ci, ct


def pair_bytes(image_feats: Any, text_feats: Any, heads: int = 8) -> int:
    """Working memory of one (image, text) pair in a text-conditioned attention head: a few
    text-sized vectors (pooled output, its projection and normalisation, the product) plus
    one attention row per head over the image's tokens (tokens ~ image bytes / text bytes).
    Measured FLAIR heads stay below this on CPU (see benchmarks/bench_conditioned_retrieval)."""
    txt_b, img_b = bytes_per_item(text_feats), bytes_per_item(image_feats)
    tokens = max(1, img_b // max(1, txt_b))
    return 4 * txt_b + heads * tokens * 4


@torch.no_grad()
def chunked_scores(
    ctx: EvalContext, image_feats: Any, text_feats: Any, budget_mb: int, desc: str = "scoring"
) -> torch.Tensor:
    """(Ni, Nt) ``method.score_features`` evaluated in images x texts chunks whose working
    memory (``pair_bytes`` per pair) fits ``budget_mb``."""
    ni, nt = num_items(image_feats), num_items(text_feats)
    pair = pair_bytes(image_feats, text_feats)
    ci, ct = chunk_sizes(ni, nt, pair, budget_mb * 2**20)
    out = torch.empty(ni, nt, dtype=torch.float32)
    blocks = [(i, t) for i in range(0, ni, ci) for t in range(0, nt, ct)]
    for i, t in ctx.bar(blocks, desc, total=len(blocks)):
        s = ctx.method.score_features(
            slice_features(image_feats, slice(i, i + ci)),
            slice_features(text_feats, slice(t, t + ct)),
        )
        assert s.shape == (min(ci, ni - i), min(ct, nt - t)), (
            f"score_features returned {tuple(s.shape)} for a {min(ci, ni - i)} x {min(ct, nt - t)} chunk"
        )
        out[i : i + ci, t : t + ct] = s.float().cpu()
    return out


# ---- capability checks -----------------------------------------------------------------------
def require(method: Method, capability: str, task: str) -> None:
    """ValueError naming method and task when the method lacks what the task needs."""
    if capability not in CAPABILITIES:
        raise KeyError(f"unknown capability '{capability}'; valid: {', '.join(CAPABILITIES)}")
    if capability not in method.capabilities():
        raise ValueError(
            f"method '{method.cfg.name}' ({type(method).__name__}) has no {capability}, "
            f"which task '{task}' needs"
        )
