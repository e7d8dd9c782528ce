"""FLAIR: Fine-grained Language-informed Image Representations (Xiao et al., CVPR 2025,
arXiv 2412.03561; code ExplainableML/flair, built on OpenCLIP).

Model (paper Sec. 3, "text-conditioned attention pooling"; released ``FLAIR`` model):

- image tower tokens after its final norm; ONE shared bias-free linear projection maps the CLS
  token to the global image embedding and the patch tokens to local tokens (``image_post``);
- text tower EOT embedding through its own projection (``text_post``) -> sub-caption embedding;
- text-conditioned attention pooling (``finegrain.heads.pooling.TextConditionedPooling``,
  f_AttnPool): LN on q/k/v, the text embedding as query, projected patch tokens (CLS excluded) as
  keys/values, plus the ``add_zero_attn`` zero slot.

Loss (paper Sec. 3, L^tcs and L^mps): ``(L_tcs + L_mps) / 2`` with one shared learnable scale ``t = exp(s)``
(``finegrain.heads.logit_scale``: t initialised to 1/0.07, clamped to ``1 <= t <= 100`` after every
optimizer step as the released ``train.py``) and bias ``b`` (released init -10; by default set to the
batch's prior -ln(B - 1) at the first training forward, ``logit_bias_init``); see ``finegrain.losses.flair``.

Data (paper Sec. 3, "diverse caption sampling"): K sub-captions of 1..3 sentences per image (``finegrain.data.captions``),
sampled in the collate from the sample's ``"subcaption"`` stream (``sample_rng``). Caption pool per sample
(``caption_source="auto"``): ``sentences``, else the sentences of ``long_caption``, else
``captions`` (each caption a "sentence": Flickr8k's 5 human captions), else the sentences of
``caption``; or, with ``caption_fields`` (``flair_vitb16``: ``DREAMLIP_FIELDS``, the released
mix of alt-text and DreamLIP's six MLLM caption lists), the concatenation of those fields'
sentences. A configured field absent from every sample of the first batch is a one-line error
naming it and the keys present. Samples whose pool is empty are skipped and counted (``batch["stats"]``
``skipped_samples``, logged as ``stats/skipped_samples``); a pool with fewer sentences than needed is sampled with replacement.

Deviations from the released code, as options: ``loss_normalization`` ("released": sums divided
by texts per image, as ``FlairLoss``; "per_image": SigLIP's / B); the negative caption of each
other image is chosen by a hash of the two samples' seeds (exact under gradient accumulation and
across ranks) instead of ``torch.randint``; across ranks each image meets one caption of every
other image of the joined batch (the released ring pools against the neighbour's subsampled
row). ``add_mps_loss=False`` gives the TCS-only ablation (released ``--add-mps-loss`` off).
``logit_bias_init`` ("prior", default): b starts at the log-odds of a positive pair at the
joined batch size, -ln(B - 1), instead of the released -10 (``"fixed"``, kept by
``flair_vitb16``): at the small batches and short runs of CPU training, b = -10 cannot move in
time and FLAIR's embeddings collapse to a constant-logit saddle (docs/flair_scenes.md).
Without an option: the hash-chosen negative caption and the cross-rank pairing above (same
expectation, different draws); ``flair_vitb16`` trains in bf16 (``train.precision=fp16``:
fp16 AMP, OpenCLIP's ``amp``).

Scoring: ``score_features`` pools every image with every text (one attention call per image
chunk) and returns the cosine with that text; ``dense_features`` returns the projected patch
tokens (the same space as text embeddings and as the keys/values of the pooling), (B, D, h, w).

Evaluation as the paper: retrieval tasks with ``variant="flair"`` read FLAIR's own files
(fixed DOCCI-FG / IIW-FG sentence lists; DCI over every split, IIW, ShareGPT4V-1k/10k and
Urban-1K with long texts re-joined as ``". ".join(split_caption(text))``), and
``finegrain.eval.flair_files.paper_retrieval_tasks`` lists the paper's table with
``scoring="conditioned"`` (``--inference-with-flair``); re-splitting the datasets' original
files (finegrain's sentence splitter) is the other variant, not comparable with the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn as nn

from finegrain.data.captions import sample_subcaptions, split_sentences
from finegrain.data.collate import add_stats
from finegrain.data.schema import sample_rng
from finegrain.encoders.base import build_image_tower, build_text_tower
from finegrain.heads.pooling import TextConditionedPooling
from finegrain.heads.projection import Projection
from finegrain.methods.base import Method, MethodConfig
from finegrain.methods.objectives import (
    MultiPositiveObjective,
    Objectives,
    TextConditionedObjective,
)
from finegrain.methods.vocab import l2
from finegrain.registry import METHODS

CaptionSource = Literal["auto", "sentences", "long_caption", "captions", "caption"]
CAPTION_SOURCES: tuple[str, ...] = get_args(CaptionSource)
_SEED_MOD = 2**31 - 1
# the released training pool (ExplainableML/flair ``data.sample_dict``): the alt-text plus
# DreamLIP's short/long captions from InstructBLIP (IB), ShareGPT4V (SV) and LLaVA (LLA)
DREAMLIP_FIELDS = (
    "raw_caption",
    "shortIB_captions",
    "longIB_captions",
    "shortSV_captions",
    "longSV_captions",
    "shortLLA_captions",
    "longLLA_captions",
)


@dataclass
class FLAIRConfig(MethodConfig):
    name: str = "flair"
    embed_dim: int = 512
    num_subcaptions: int = 8  # K sub-captions per image
    max_sentences: int = 3  # each sub-caption has 1..max_sentences sentences
    sampling: Literal["diverse", "consecutive", "random"] = "diverse"  # finegrain.data.captions
    caption_source: CaptionSource = "auto"
    # non-empty: the pool is the concatenation of these sample fields (top-level or in the
    # JSON's extra fields; strings split into sentences, lists taken as sentences), e.g.
    # DREAMLIP_FIELDS as released; caption_source is then unused
    caption_fields: list[str] = field(default_factory=list)
    pool_heads: int = 8
    zero_slot: bool = True  # the add_zero_attn "attend to nothing" key/value
    add_mps_loss: bool = True  # total = (tcs + mps) / 2; False: tcs only
    add_tcs_loss: bool = True  # False: mps only (an ablation; not a released switch)
    loss_normalization: Literal["released", "per_image"] = "released"
    exchange: Literal["gather", "ring"] = "gather"  # texts of other ranks, with gradient
    init_logit_bias: float = -10.0  # b at construction (released: -10)
    # "prior": the first training forward sets b to the log-odds of a positive pair at the
    # (joined) batch size B, -ln(B - 1) (heads.logit_scale.prior_logit_bias); "fixed": b stays at
    # init_logit_bias as released (fit for B ~ 1k-32k; at B = 32 it collapses the embeddings)
    logit_bias_init: Literal["prior", "fixed"] = "prior"
    score_max_elements: int = 2**25  # pooled entries per chunk in score_features


def _check_config(cfg: FLAIRConfig) -> None:
    if not (cfg.add_tcs_loss or cfg.add_mps_loss):
        raise ValueError("method.add_tcs_loss and method.add_mps_loss are both false: no loss "
                         "to train; keep at least one")  # fmt: skip
    if cfg.num_subcaptions < 1 or cfg.max_sentences < 1:
        raise ValueError(
            f"method.num_subcaptions and method.max_sentences must be >= 1, got "
            f"{cfg.num_subcaptions} and {cfg.max_sentences}"
        )
    if cfg.embed_dim % cfg.pool_heads:
        raise ValueError(
            f"method.embed_dim={cfg.embed_dim} must be divisible by method.pool_heads={cfg.pool_heads}"
        )


def _field(sample: dict[str, Any], name: str) -> Any:
    """A schema field, else an extra field of the sample's JSON (``meta``)."""
    if name in sample:
        return sample[name]
    meta = sample.get("meta")
    return meta.get(name) if isinstance(meta, dict) else None


def _sentences(value: Any) -> list[str]:
    if isinstance(value, str):
        return split_sentences(value)
    if isinstance(value, list):
        return [s.strip() for s in value if isinstance(s, str) and s.strip()]
    return []


def caption_pool(
    sample: dict[str, Any], source: str = "auto", fields: list[str] | tuple[str, ...] = ()
) -> list[str]:
    """The sentences one sample's sub-captions are drawn from (see module docstring)."""
    if fields:
        return [s for name in fields for s in _sentences(_field(sample, name))]

    def get(name: str) -> list[str]:
        value = sample.get(name)
        if not value:
            return []
        if name in ("long_caption", "caption"):
            return split_sentences(value) if isinstance(value, str) else []
        if isinstance(value, str):  # a plain string where a list belongs: never char by char
            return split_sentences(value) if name == "sentences" else [value.strip()]
        return [s.strip() for s in value if isinstance(s, str) and s.strip()]

    if source != "auto":
        return get(source)
    for name in ("sentences", "long_caption", "captions", "caption"):
        if pool := get(name):
            return pool
    return []


def check_caption_fields(samples: list[dict[str, Any]], fields: list[str]) -> None:
    """Fail fast: a configured field that no sample of the batch has is a one-line error."""
    for name in fields:
        if all(_field(s, name) is None for s in samples):
            present = sorted(
                {k for s in samples for k, v in s.items() if isinstance(v, str | list)}
                | {k for s in samples for k in (s.get("meta") or {})}
            )
            raise ValueError(
                f"method.caption_fields: field '{name}' is absent from every sample of the first "
                f"batch; present keys: {', '.join(present)}"
            )


class FLAIRCollate:
    """Picklable collate: schema samples -> ``image`` (B, 3, H, W), ``texts`` (B, K, L),
    ``pair_seed`` (B,), ``stats`` {``skipped_samples``: samples without any caption}."""

    def __init__(
        self,
        tokenizer: Any,
        k: int,
        max_sentences: int,
        mode: str,
        source: str,
        fields: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.tokenizer, self.k, self.max_sentences = tokenizer, k, max_sentences
        self.mode, self.source, self.fields = mode, source, list(fields)
        self.checked = not self.fields  # fields are checked on the first batch (per worker)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.checked:
            check_caption_fields(samples, self.fields)
            self.checked = True
        kept, subcaps = [], []
        for s in samples:
            pool = caption_pool(s, self.source, self.fields)
            if not pool:
                continue
            rng = sample_rng(s.get("seed", 0), "subcaption")
            subcaps += sample_subcaptions(pool, self.k, self.max_sentences, rng, mode=self.mode)
            kept.append(s)
        if not kept:
            raise ValueError(
                f"none of the {len(samples)} samples in this batch has a non-empty caption "
                f"(caption_source='{self.source}'; valid choices: {', '.join(CAPTION_SOURCES)})"
            )
        texts = self.tokenizer(subcaps)  # (B*K, L)
        batch = {
            "image": torch.stack([s["image"] for s in kept]),  # (B, 3, H, W)
            "texts": texts.view(len(kept), self.k, -1),  # (B, K, L)
            "pair_seed": torch.tensor(
                [int(s.get("seed", i)) % _SEED_MOD for i, s in enumerate(kept)]
            ),
        }
        return add_stats(batch, skipped_samples=len(samples) - len(kept))


@METHODS.register("flair")
class FLAIR(Method):
    Config = FLAIRConfig

    def __init__(self, cfg: FLAIRConfig) -> None:
        super().__init__(cfg)
        _check_config(cfg)
        self.image = build_image_tower(cfg.image)
        self.text = build_text_tower(cfg.text)
        d, iw, tw = cfg.embed_dim, self.image.width, self.text.width
        # both nn.Linear inits drawn before both OpenCLIP inits: the random draws of the
        # original FLAIR file, so a seed gives the same initial weights as before
        w_img, w_txt = (nn.Linear(w, d, bias=False).weight.detach() for w in (iw, tw))
        nn.init.normal_(w_img, std=iw**-0.5)
        nn.init.normal_(w_txt, std=tw**-0.5)
        self.image_proj = Projection(iw, d, weight=w_img)  # shared: CLS and patches
        self.text_proj = Projection(tw, d, weight=w_txt)
        self.pooling = TextConditionedPooling(d, heads=cfg.pool_heads, zero_slot=cfg.zero_slot)
        # parameters self.logit_scale (s = ln t) and self.logit_bias; with "prior", b is set to
        # the first training batch's prior once (a loaded state dict keeps its own b)
        self.make_temperature(cfg.init_logit_bias, bias_prior=cfg.logit_bias_init == "prior")
        self.objectives = flair_objectives(cfg)

    # ---- towers + projections -------------------------------------------------------
    def _image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        out = self.image(images)
        return (
            self.image_proj(out.pooled),
            self.image_proj(out.tokens),
            out.grid_hw,
        )  # (B,D), (B,N,D)

    def _text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_proj(self.text(tokens).pooled)  # (T, D)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        g = self._image(images)[0]
        return l2(g) if normalize else g

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        t = self._text(tokens)
        return l2(t) if normalize else t

    # ---- training -------------------------------------------------------------------
    def make_collate(self, train: bool = True) -> FLAIRCollate:
        c = self.cfg
        return FLAIRCollate(
            self.text.tokenizer,
            c.num_subcaptions,
            c.max_sentences,
            c.sampling,
            c.caption_source,
            c.caption_fields,
        )

    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image, tokens, _ = self._image(batch["image"])
        ids = batch["texts"]  # (B, K, L)
        assert ids.dim() == 3, f"batch['texts'] must be (B, K, L), got {tuple(ids.shape)}"
        b, k, length = ids.shape
        texts = self._text(ids.reshape(b * k, length)).view(b, k, -1)  # (B, K, D)
        seed = batch.get("pair_seed")
        if seed is None:
            seed = torch.arange(b)
        return {
            "image": image,
            "image_tokens": tokens,
            "texts": texts,
            "pair_seed": seed.to(image.device),
        }

    # ---- inference ------------------------------------------------------------------
    def image_features_for_scoring(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D): row 0 the global embedding, rows 1.. the projected patch tokens."""
        g, tokens, _ = self._image(images)
        return torch.cat([g.unsqueeze(1), tokens], dim=1)

    def text_features_for_scoring(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._text(tokens)  # (T, D), un-normalised: the pooling query

    def score_features(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """(Ni, Nt) text-conditioned similarity: cos(pool(text_j | image_i), text_j)."""
        tokens = image_feats[:, 1:]  # (Ni, N, D)
        return self.pooling.similarity(text_feats, tokens, self.cfg.score_max_elements)

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) projected patch tokens (joint text-embedding space)."""
        out = self.image(images)
        return out.token_map(self.image_proj(out.tokens))

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(Ni, Nt, h, w) text-conditioned pooling attention of every text over every image's
        patches (heads averaged; the zero slot's share left out, so a row sums to <= 1).
        For figures: where the pooled embedding of (image, text) looks."""
        _, patches, (h, w) = self._image(images)  # (Ni, N, D)
        text = self._text(tokens)  # (Nt, D)
        q = text.unsqueeze(0).expand(patches.shape[0], *text.shape)  # (Ni, Nt, D)
        att = self.pooling.attention_weights(q, patches)[..., : h * w]  # (Ni, Nt, N)
        return att.reshape(att.shape[0], att.shape[1], h, w)


def flair_objectives(cfg: FLAIRConfig) -> Objectives:
    """L_tcs, and with ``add_mps_loss`` L_mps, each weighted 1/2 (the released mean)."""
    kw = {"exchange": cfg.exchange, "normalization": cfg.loss_normalization}
    if not cfg.add_tcs_loss:  # the MPS-only ablation (not a released switch)
        return Objectives([(MultiPositiveObjective(**kw), {})])
    if not cfg.add_mps_loss:
        return Objectives([(TextConditionedObjective(**kw), {})])
    return Objectives([(TextConditionedObjective(**kw), {"tcs_loss": 0.5}),
                       (MultiPositiveObjective(**kw), {"mps_loss": 0.5})])  # fmt: skip
