"""Picklable tokenizers: ``list[str] -> LongTensor (N, context_length)``.

The heavy tokenizer objects are built lazily and dropped when pickling, so a collate that
holds a tokenizer can be sent to DataLoader workers cheaply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finegrain.compat import dependency_guard

TOKENIZERS = ("clip", "hf")


class ClipTokenizer:
    """CLIP byte-pair-encoding tokenizer (open_clip's ``SimpleTokenizer``).

    ``[SOT] tokens [EOT] 0 ...``; too long captions are truncated keeping the EOT token last,
    so EOT pooling (argmax of the ids; EOT has the largest id) always finds it.
    """

    vocab_size = 49408
    pad_id = 0
    sot_id = 49406
    eot_id = 49407

    def __init__(self, context_length: int = 77) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {context_length}")
        self.context_length = context_length
        self._tok: Any = None

    @dependency_guard("open_clip_torch", "the open_clip tokenizer")
    def backend(self) -> Any:
        """open_clip's ``SimpleTokenizer`` (built on first use)."""
        if self._tok is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._tok = SimpleTokenizer(context_length=self.context_length)
        return self._tok

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        tok = self.backend()
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)  # (N, L)
        for i, text in enumerate(texts):
            ids = [self.sot_id, *tok.encode(text), self.eot_id]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length - 1] + [self.eot_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def __getstate__(self) -> dict:
        return {"context_length": self.context_length, "_tok": None}


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (no hub access)."""

    def __init__(self, path: str | Path, context_length: int = 77) -> None:
        self.path = str(path)
        self.context_length = context_length
        self._tok: Any = None

    @dependency_guard("transformers", "loading the Hugging Face tokenizer")
    def backend(self) -> Any:
        """The transformers tokenizer (loaded from ``path`` on first use)."""
        if self._tok is None:
            if not Path(self.path).is_dir():
                raise ValueError(f"tokenizer directory not found: {self.path}")
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        return self._tok

    @property
    def pad_id(self) -> int:
        pad = self.backend().pad_token_id
        return 0 if pad is None else int(pad)

    @property
    def vocab_size(self) -> int:
        return len(self.backend())

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        enc = self.backend()(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return enc["input_ids"].long()  # (N, L)

    def __getstate__(self) -> dict:
        return {"path": self.path, "context_length": self.context_length, "_tok": None}


def build_tokenizer(name: str, context_length: int, path: str = "") -> ClipTokenizer | HFTokenizer:
    """``clip`` (open_clip BPE) or ``hf`` (from the local directory ``path``)."""
    if name == "clip":
        return ClipTokenizer(context_length)
    if name == "hf":
        if not path:
            raise ValueError(
                "tokenizer 'hf' needs text.path: a local directory with tokenizer files"
            )
        return HFTokenizer(path, context_length)
    raise ValueError(f"unknown tokenizer '{name}'; valid choices: {', '.join(TOKENIZERS)}")
