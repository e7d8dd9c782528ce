"""The two models of GRAIN's annotation step, behind small protocols so they can be swapped.

- ``Describer``: images -> raw MLLM answers. ``HFDescriber`` loads any Hugging Face
  image-text-to-text model from a local directory (``AutoProcessor`` +
  ``AutoModelForImageTextToText``; LLaVA, Qwen2-VL, SmolVLM, ...) and decodes greedily.
- ``Grounder``: (image, descriptions) -> one (box, score) or None per description.
  ``HFGrounder`` loads an open-vocabulary detector from a local directory (``AutoProcessor`` +
  ``AutoModelForZeroShotObjectDetection``): OWL-ViT / OWLv2 score every description as a
  query in one forward pass; other detectors (Grounding DINO) are run once per description.
  Each description gets the single highest-scoring box; below ``threshold`` it is dropped.

Boxes are returned as [x0, y0, x1, y1] normalised to the original image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

Box = list[float]


class Describer(Protocol):
    def describe(self, images: list[Image.Image]) -> list[str]: ...


class Grounder(Protocol):
    def ground(self, image: Image.Image, texts: list[str]) -> list[tuple[Box, float] | None]: ...


def _local_dir(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not path or not p.is_dir():
        raise ValueError(
            f"{what} must be a local model directory (save_pretrained output), got '{path}'"
        )
    return p


def _cxcywh_to_xyxy_clipped(b: torch.Tensor, sx: float = 1.0, sy: float = 1.0) -> Box:
    cx, cy, w, h = b.tolist()
    box = [(cx - w / 2) * sx, (cy - h / 2) * sy, (cx + w / 2) * sx, (cy + h / 2) * sy]
    return [round(min(max(v, 0.0), 1.0), 5) for v in box]  # rounded before the area check


class HFDescriber:
    """An MLLM from a local path writing a caption + region list per image (greedy decoding)."""

    def __init__(
        self, path: str, prompt: str, max_new_tokens: int = 256, device: str = "cpu"
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        local = _local_dir(path, "describer")
        self.processor = AutoProcessor.from_pretrained(local)
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # batched generation with a decoder-only LM
        self.model = AutoModelForImageTextToText.from_pretrained(local).to(device).eval()
        self.prompt, self.max_new_tokens, self.device = prompt, max_new_tokens, device

    def _prompt(self) -> str:
        if getattr(self.processor, "chat_template", None):
            msgs = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": self.prompt}],
                }
            ]
            return self.processor.apply_chat_template(msgs, add_generation_prompt=True)
        token = getattr(self.processor, "image_token", "<image>")
        return f"{token} {self.prompt}"

    @torch.no_grad()
    def describe(self, images: list[Image.Image]) -> list[str]:
        prompt = self._prompt()
        inputs = self.processor(
            images=images, text=[prompt] * len(images), return_tensors="pt", padding=True
        )
        inputs = inputs.to(self.device)
        # transformers 4.x processors also return token_type_ids, which generate() rejects as
        # unused by image-to-text models (5.x no longer returns them)
        inputs.pop("token_type_ids", None)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]  # (B, T) generated tokens only
        return [str(t) for t in self.processor.batch_decode(new, skip_special_tokens=True)]


class HFGrounder:
    """An open-vocabulary detector from a local path: best box per description above a threshold."""

    def __init__(self, path: str, threshold: float = 0.1, device: str = "cpu") -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        local = _local_dir(path, "detector")
        self.processor = AutoProcessor.from_pretrained(local)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(local).to(device).eval()
        self.kind = str(self.model.config.model_type)
        self.threshold, self.device = threshold, device
        tc = getattr(self.model.config, "text_config", None)
        self.max_len = int(getattr(tc, "max_position_embeddings", 0) or 0)

    def _text_kwargs(self) -> dict:
        if self.kind.startswith("owl") and self.max_len:  # truncate long descriptions
            return {"padding": "max_length", "truncation": True, "max_length": self.max_len}
        return {"padding": True, "truncation": True}

    @torch.no_grad()
    def _owl(self, image: Image.Image, texts: list[str]) -> list[tuple[Box, float]]:
        inputs = self.processor(
            text=[texts], images=image, return_tensors="pt", **self._text_kwargs()
        )
        out = self.model(**inputs.to(self.device))
        scores = out.logits[0].sigmoid()  # (P, T) patch x query
        best, idx = scores.max(0)  # (T,)
        boxes = out.pred_boxes[0][idx]  # (T, 4) cxcywh
        sx = sy = 1.0
        if self.kind == "owlv2":  # OWLv2 pads to a square at the bottom/right before resizing
            side = max(image.size)
            sx, sy = side / image.size[0], side / image.size[1]
        return [(_cxcywh_to_xyxy_clipped(b, sx, sy), float(s)) for b, s in zip(boxes, best)]

    @torch.no_grad()
    def _per_text(self, image: Image.Image, text: str) -> tuple[Box, float]:
        phrase = text if text.endswith(".") else text + "."  # Grounding DINO's phrase format
        inputs = self.processor(
            images=image, text=phrase, return_tensors="pt", **self._text_kwargs()
        )
        out = self.model(**inputs.to(self.device))
        scores = out.logits[0].sigmoid().max(-1).values  # (Q,) best token per query
        i = int(scores.argmax())
        return _cxcywh_to_xyxy_clipped(out.pred_boxes[0][i]), float(scores[i])

    def ground(self, image: Image.Image, texts: list[str]) -> list[tuple[Box, float] | None]:
        if not texts:
            return []
        if self.kind.startswith("owl"):
            found = self._owl(image, texts)
        else:
            found = [self._per_text(image, t) for t in texts]
        return [
            (b, s) if s >= self.threshold and b[2] > b[0] and b[3] > b[1] else None
            for b, s in found
        ]
