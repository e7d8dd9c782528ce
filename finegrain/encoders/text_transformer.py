"""Native CLIP-style causal text transformer (Radford et al. 2021, Sec. 2.4): token + learned
position embedding, causal pre-norm blocks (fused SDPA, ``is_causal``), final LayerNorm and
pooling at the EOT token; ``activation=quick_gelu`` is OpenAI CLIP's (and GRAIN's) MLP. The position embedding is sized by ``context_length`` (not fixed
to 77); shorter inputs use its first L rows. Padding after the batch's last EOT is not run
through the blocks (causal attention makes that exact); its output states are zeros.
"""

from __future__ import annotations

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


@TEXT_TOWERS.register("transformer")
def build_text_transformer(cfg: TextTowerConfig) -> TextTransformer:
    return TextTransformer(cfg)
