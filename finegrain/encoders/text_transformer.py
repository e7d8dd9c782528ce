"""Native CLIP-style causal text transformer (Radford et al. 2021, Sec. 2.4): token + learned
position embedding, causal pre-norm blocks (fused SDPA, ``is_causal``), final LayerNorm and
pooling at the EOT token; ``activation=quick_gelu`` is OpenAI CLIP's (and GRAIN's) MLP. The position embedding is sized by ``context_length`` (not fixed
to 77); shorter inputs use its first L rows. Padding after the batch's last EOT is not run
through the blocks (causal attention makes that exact); its output states are zeros.

Longer text at evaluation time, without training: ``stretch_positions(tower, new_length,
mode)`` resamples the learned position table (native and open_clip text towers) to
``new_length`` rows and widens the tokenizer (``stretch_table`` is the pure function):

- ``mode="longclip"`` (Long-CLIP, Zhang et al. ECCV 2024, Sec. 3.1 "knowledge-preserved
  stretching"): the first ``keep`` (20) rows are kept, row j >= keep is the linear
  interpolation at the fractional old position t = keep + (j - keep) / r,
  r = (new_length - keep) / (L - keep), between rows floor(t) and floor(t) + 1. Released code
  (beichenzbc/Long-CLIP ``model/longclip.py`` ``load``) uses r = 4 (77 -> 248 rows) and
  extrapolates the last r - 1 rows past old row L - 1 with the last difference,
  PE[L-1] + (t - (L-1)) (PE[L-1] - PE[L-2]); we follow that for every r. The paper describes
  only the interpolation (keep 20, ratio 4), not these tail rows. Its code then fine-tunes a
  residual copy of the rows past 20 (``positional_embedding_res``); at load time the two add
  up to this table, so an un-fine-tuned stretch here is exactly theirs.
- ``mode="linear"``: plain linear interpolation of all rows, endpoints aligned
  (t = j (L-1) / (new_length-1)), the baseline Long-CLIP compares against.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from finegrain.data.tokenizers import ClipTokenizer, HFTokenizer, build_tokenizer
from finegrain.encoders.base import TextTowerConfig
from finegrain.encoders.vit import Transformer, freeze_except_last
from finegrain.outputs import TextOutput
from finegrain.registry import TEXT_TOWERS

POOLINGS = ("eot", "mean", "cls")


def eot_positions(
    ids: torch.Tensor, tokenizer: ClipTokenizer | HFTokenizer, pad_id: int
) -> torch.Tensor:
    """(B,) index of the end-of-text token: the argmax id for the CLIP BPE (EOT has the largest
    id), the last non-padding token for other tokenizers."""
    if isinstance(tokenizer, ClipTokenizer):
        return ids.argmax(dim=-1)
    real = (ids != pad_id).long()  # (B, L)
    return (real.sum(dim=-1) - 1).clamp(min=0)


def pool_tokens(
    x: torch.Tensor, mask: torch.Tensor, pooling: str, eot: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, L, D) -> (B, D) by ``eot`` (needs ``eot`` indices), ``mean`` over real tokens, or ``cls``."""
    if pooling == "eot":
        assert eot is not None, "eot pooling needs the EOT positions"
        return x[torch.arange(x.shape[0], device=x.device), eot]
    if pooling == "mean":
        m = mask.to(x.dtype)[..., None]  # (B, L, 1)
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)
    if pooling == "cls":
        return x[:, 0]
    raise ValueError(f"unknown text pooling '{pooling}'; valid choices: {', '.join(POOLINGS)}")


class TextTransformer(nn.Module):
    """Causal transformer text tower returning ``TextOutput(pooled, tokens, mask)``."""

    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        self.tokenizer = build_tokenizer(cfg.tokenizer, cfg.context_length, cfg.path)
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(
                f"text.vocab_size={cfg.vocab_size} is smaller than the '{cfg.tokenizer}' "
                f"tokenizer's vocabulary ({self.tokenizer.vocab_size})"
            )
        self.width, self.context_length, self.pooling = cfg.width, cfg.context_length, cfg.pooling
        self.pad_id = self.tokenizer.pad_id
        self.trim_padding = True  # skip the all-padding tail (exact, see forward)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(
            cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, activation=cfg.activation
        )
        self.transformer.grad_checkpointing = cfg.grad_checkpointing
        self.ln_final = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        freeze_except_last(self, self.transformer.blocks, cfg.trainable_blocks, [self.ln_final])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, ids: torch.Tensor) -> TextOutput:
        b, length = ids.shape
        if length > self.context_length:
            raise ValueError(f"got {length} tokens but context_length is {self.context_length}")
        eot = eot_positions(ids, self.tokenizer, self.pad_id)  # (B,)
        # Causal attention: positions after the last EOT never influence earlier ones, so we
        # run only the first max(EOT)+1 positions (exact for every real token) and pad back.
        run = int(eot.max().item()) + 1 if self.trim_padding else length
        x = self.token_embedding(ids[:, :run]) + self.positional_embedding[:run]  # (B, run, D)
        x = self.ln_final(self.transformer(x, is_causal=True))  # (B, run, D)
        if run < length:
            x = F.pad(x, (0, 0, 0, length - run))  # (B, L, D), zeros at padding
        # real tokens: everything up to and including EOT (CLIP pads with id 0, also a real token id)
        mask = torch.arange(length, device=ids.device)[None, :] <= eot[:, None]  # (B, L)
        pooled = pool_tokens(x, mask, self.pooling, eot)
        return TextOutput(pooled=pooled, tokens=x, mask=mask)


LONGCLIP_KEEP = 20  # Long-CLIP keeps the first 20 positions
LONGCLIP_RATIO = 4  # and stretches the rest 4x (77 -> 248)


def longclip_length(length: int, keep: int = LONGCLIP_KEEP, ratio: int = LONGCLIP_RATIO) -> int:
    """The released Long-CLIP context for an ``length``-position tower (77 -> 248)."""
    return keep + ratio * (length - keep)


def stretch_table(
    pos: torch.Tensor, new_length: int, mode: Literal["longclip", "linear"] = "longclip",
    keep: int = LONGCLIP_KEEP,
) -> torch.Tensor:  # fmt: skip
    """(L, D) position table -> (new_length, D), see the module docstring for the modes."""
    length = pos.shape[0]
    if new_length < length or length < 2:
        raise ValueError(f"cannot stretch {length} positions to {new_length} (must not shrink)")
    if mode == "linear":
        t = torch.arange(new_length, dtype=torch.float64) * (length - 1) / max(new_length - 1, 1)
        keep = 0
    elif mode == "longclip":
        if not 0 <= keep <= length - 1:
            raise ValueError(f"keep={keep} must lie in [0, {length - 1}] for {length} positions")
        r = (new_length - keep) / (length - keep)
        t = keep + (torch.arange(new_length - keep, dtype=torch.float64)) / r
        t = torch.cat([torch.arange(keep, dtype=torch.float64), t])
    else:
        raise ValueError(f"unknown stretch mode '{mode}'; valid choices: longclip, linear")
    lo = t.floor().long().clamp(max=length - 2)  # (new,) left row; the tail extrapolates
    frac = (t - lo).to(torch.float64)[:, None]  # (new, 1), > 1 only past row L-1
    p = pos.detach().double()
    out = p[lo] + frac * (p[lo + 1] - p[lo])  # (new, D)
    out[:keep] = p[:keep]  # bit-exact kept rows
    return out.to(pos.dtype)


def stretch_positions(
    tower: nn.Module,
    new_length: int,
    mode: Literal["longclip", "linear"] = "longclip",
    keep: int = LONGCLIP_KEEP,
) -> nn.Module:
    """A copy of ``tower`` whose learned position table is stretched to ``new_length`` rows
    (``stretch_table``) and whose tokenizer and ``context_length`` follow: native
    ``transformer`` and ``open_clip`` text towers (causal mask rebuilt) and Hugging Face CLIP
    text towers (``hf_clip``). Other towers raise a one-line error (SigLIP: trained on
    fixed-length padded text, pooled at the last position; BERT-like encoders: a different
    position scheme)."""
    emb = getattr(getattr(tower, "text_model", None), "embeddings", None)
    hf_table = getattr(emb, "position_embedding", None)
    pos = getattr(tower, "positional_embedding", None)
    if getattr(tower, "kind", "clip") != "clip" or not (
        isinstance(hf_table, nn.Embedding)
        or (isinstance(pos, torch.Tensor) and pos.dim() == 2 and hasattr(tower, "tokenizer"))
    ):
        name = f"{type(tower).__name__}" + (f" ({tower.kind})" if hasattr(tower, "kind") else "")
        raise ValueError(
            f"text tower {name} cannot stretch its positions (needs a learned (L, D) causal "
            "position table: native 'transformer', 'open_clip' or 'hf_clip' CLIP text towers)"
        )
    new = copy.deepcopy(tower)
    if isinstance(hf_table, nn.Embedding):
        table = stretch_table(hf_table.weight, new_length, mode, keep)  # (new, D)
        e = new.text_model.embeddings
        e.position_embedding = nn.Embedding.from_pretrained(table, freeze=False)
        e.position_embedding.weight.requires_grad_(hf_table.weight.requires_grad)
        ids = torch.arange(new_length, device=table.device)[None]
        e.register_buffer("position_ids", ids, persistent=False)
        new.text_model.config.max_position_embeddings = new_length
    else:
        table = stretch_table(pos, new_length, mode, keep)
        new.positional_embedding = nn.Parameter(table, requires_grad=pos.requires_grad)
    new.context_length = new_length
    new.tokenizer = copy.copy(tower.tokenizer)
    new.tokenizer.context_length = new_length  # the BPE/HF objects inside only encode: shared
    if isinstance(getattr(new, "attn_mask", None), torch.Tensor):
        mask = torch.full((new_length, new_length), float("-inf"), device=table.device).triu_(1)
        new.attn_mask = mask.to(new.attn_mask.dtype)
    return new


@TEXT_TOWERS.register("transformer")
def build_text_transformer(cfg: TextTowerConfig) -> TextTransformer:
    return TextTransformer(cfg)
