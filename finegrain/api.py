"""Use a trained or pretrained model without training: ``finegrain.load``.

    import finegrain
    model, preprocess = finegrain.load("runs/clip_smoke")          # or a checkpoint / spec
    probs = model.classify(images, ["circle", "square"])            # (B, C)

``load`` accepts a run directory, a folder holding one run (``finegrain demo``'s ``OUT`` or
``OUT/runs/<method>``), a checkpoint directory or ``model.safetensors`` file, or a spec
``open_clip:MODEL=FILE``, ``hf:DIR``, ``flair:[MODEL=]FILE`` (``finegrain.interop``).
Images are PIL images, file paths, or tensors (``(3, H, W)`` / ``(B, 3, H, W)``, already
preprocessed); texts a string or a list of strings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from finegrain.eval.common import eval_transform
from finegrain.eval.config import ZeroShotTaskConfig
from finegrain.eval.segmentation import predict_masks
from finegrain.eval.templates import class_prompts, load_templates
from finegrain.eval.zeroshot import region_scores, released_region_scores, renormalize_classes
from finegrain.interop import load_spec
from finegrain.interop.common import read_scale_bias

ImageLike = Any  # PIL.Image | str | Path | Tensor | a sequence of those


def load(
    path_or_spec: str | Path, device: str = "cpu", strict: bool = True
) -> tuple[FinegrainModel, Callable[[Any], torch.Tensor]]:
    """``(model, preprocess)``: ``preprocess(PIL image) -> (3, S, S)`` normalised tensor.

    A folder holding several runs raises ``ValueError`` listing them, a path without a run
    ``FileNotFoundError`` saying what to pass (one line each, no chained traceback)."""
    method, cfg, _ = load_spec(str(path_or_spec), strict=strict, device=device)
    model = FinegrainModel(method, cfg, device)
    return model, model.preprocess


class FinegrainModel:
    """A finegrain ``Method`` in eval mode with a friendly inference API."""

    def __init__(self, method: Any, config: Any, device: str | torch.device = "cpu") -> None:

        self.method, self.config = method.eval(), config
        self.device = torch.device(device)
        size = int(config.method.image.image_size)
        self.preprocess = eval_transform(size, tuple(config.data.mean), tuple(config.data.std))

    @property
    def name(self) -> str:
        return str(self.config.method.name)

    # ---- inputs ---------------------------------------------------------------------
    def images(self, images: ImageLike) -> torch.Tensor:
        """(B, 3, S, S) on the model's device from PIL images, paths or tensors."""
        if isinstance(images, torch.Tensor):
            x = images if images.dim() == 4 else images.unsqueeze(0)
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"image tensors must be (3, H, W) or (B, 3, H, W), got {tuple(images.shape)}")  # fmt: skip
            return x.to(self.device, torch.float32)
        items = list(images) if isinstance(images, list | tuple) else [images]
        if not items:
            raise ValueError("no images given")
        return torch.stack([self._one(i) for i in items]).to(self.device)

    def _one(self, item: Any) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            return item.float()
        if isinstance(item, str | Path):
            from PIL import Image

            with Image.open(item) as im:
                return self.preprocess(im.convert("RGB"))
        if hasattr(item, "convert"):  # PIL image
            return self.preprocess(item.convert("RGB"))
        raise ValueError(f"unsupported image type {type(item).__name__}; give PIL, path or tensor")

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no texts given")
        return self.method.tokenize(texts).to(self.device)

    # ---- embeddings and scores ------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, images: ImageLike, normalize: bool = True) -> torch.Tensor:
        """(B, E) global image embeddings."""
        return self.method.encode_image(self.images(images), normalize=normalize)

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str], normalize: bool = True) -> torch.Tensor:
        """(T, E) text embeddings."""
        return self.method.encode_text(self.tokenize(texts), normalize=normalize)

    @property
    def logit_scale(self) -> float:

        return float(read_scale_bias(self.method)[0].exp())

    @torch.no_grad()
    def score(self, images: ImageLike, texts: str | Sequence[str]) -> torch.Tensor:
        """(B, T) cosine similarity; text-conditioned (e.g. FLAIR's pooling per text) where the
        method has it."""
        return self.method.score(self.images(images), self.tokenize(texts)).float()

    @torch.no_grad()
    def classify(
        self,
        images: ImageLike,
        class_names: Sequence[str],
        descriptions: dict[str, list[str]] | None = None,
        templates: str | Sequence[str] = "plain",
        *,
        descriptor_prompts: str = "released",
        class_vectors: str = "auto",
        region_score: str = "released",
        fusion_alpha: float = 1.0,
    ) -> torch.Tensor:
        """(B, C) class probabilities: softmax over classes of ``t * s_c`` with the model's
        logit scale ``t``. ``s_c`` is the zero-shot evaluation's class score
        (``finegrain.eval.zeroshot``, same options as ``ZeroShotTaskConfig``): the cosine with
        the class vector (mean of normalised prompt embeddings, renormalised per
        ``class_vectors``; with descriptions the prompts follow ``descriptor_prompts``, GRAIN
        Sec. 3.4), fused with the region score (``region_score``) as ``alpha * global +
        (1 - alpha) * region`` for ``fusion_alpha < 1`` (region-query methods); for
        text-conditioned methods the mean conditioned score of the class's prompts."""
        cfg = ZeroShotTaskConfig(
            descriptions="builtin" if descriptions is not None else "",
            descriptor_prompts=descriptor_prompts,
            class_vectors=class_vectors,
            region_score=region_score,
            fusion_alpha=fusion_alpha,
        )  # validates the choices (one-line ConfigError)
        if not 0.0 <= fusion_alpha <= 1.0:
            raise ValueError(f"fusion_alpha must lie in [0, 1], got {fusion_alpha}")
        names = list(class_names)
        temps = load_templates(templates) if isinstance(templates, str) else list(templates)
        prompts = class_prompts(names, temps, descriptions, descriptor_prompts)
        flat = [p for ps in prompts for p in ps]
        owner = torch.tensor([c for c, ps in enumerate(prompts) for _ in ps], device=self.device)
        x = self.images(images)
        if fusion_alpha < 1.0 and not self.method.has_regions:
            raise ValueError(f"fusion_alpha < 1 needs a region head; method '{self.name}' has none")
        if self.method.has_conditioned_score:
            if fusion_alpha < 1.0:
                raise ValueError("region fusion (fusion_alpha < 1) needs a global-score method")
            per_prompt = self.method.score(x, self.tokenize(flat)).float()  # (B, P)
            scores = torch.zeros(x.shape[0], len(prompts), device=self.device)
            scores = scores.index_add_(1, owner, per_prompt) / torch.bincount(owner).float()
            return (self.logit_scale * scores).softmax(dim=-1)
        renorm = renormalize_classes(cfg, self.method)
        classes = self._class_embeddings(flat, owner, len(prompts), renorm)  # (C, E)
        scores = F.normalize(self.encode_image(x).float(), dim=-1) @ classes.t()  # (B, C)
        if fusion_alpha < 1.0:
            reg = self._region_scores(x, names, descriptions, classes, region_score)
            scores = fusion_alpha * scores + (1 - fusion_alpha) * reg
        return (self.logit_scale * scores).softmax(dim=-1)

    def _region_scores(
        self,
        x: torch.Tensor,
        names: list[str],
        descriptions: dict[str, list[str]] | None,
        classes: torch.Tensor,
        region_score: str,
    ) -> torch.Tensor:
        """(B, C) region score of ``finegrain.eval.zeroshot`` ("released": mean over queries of
        the max over the class's raw descriptors, the name without descriptions)."""
        region = F.normalize(self.method.region_embeddings(x).float(), dim=-1)  # (B, Q, E)
        if region_score != "released":
            return region_scores(region, classes)
        raw = [[d for d in (descriptions or {}).get(c, []) if d.strip()] or [c] for c in names]
        owner = torch.tensor([c for c, ds in enumerate(raw) for _ in ds])
        emb = F.normalize(self.encode_text([d for ds in raw for d in ds]).float(), dim=-1)
        reg = released_region_scores(region.cpu(), emb.cpu(), owner, len(names))  # (B, C)
        return reg.to(x.device)

    def _class_embeddings(
        self, flat: list[str], owner: torch.Tensor, n: int, renormalize: bool = True
    ) -> torch.Tensor:
        emb = F.normalize(self.encode_text(flat).float(), dim=-1)  # (P, E)
        summed = torch.zeros(n, emb.shape[1], device=emb.device).index_add_(0, owner, emb)
        if renormalize:
            return F.normalize(summed, dim=-1)  # (C, E)
        return summed / torch.bincount(owner, minlength=n).float()[:, None]

    @torch.no_grad()
    def segment(
        self, image: ImageLike, class_names: Sequence[str], threshold: float = 0.0
    ) -> torch.Tensor:
        """(H, W) label map at the model's input size: ``1 + argmax_c cos(z(p), w_c)`` over the
        method's dense (per-patch) features upsampled bilinearly; 0 where the best cosine is
        below ``threshold`` (background)."""
        x = self.images(image)[:1]
        dense = self.method.dense_features(x)  # (1, E, h, w)
        owner = torch.arange(len(class_names), device=self.device)
        classes = self._class_embeddings(list(class_names), owner, len(class_names))
        return predict_masks(dense, classes, [tuple(x.shape[-2:])], threshold)[0]

    @torch.no_grad()
    def regions(
        self, image: ImageLike, class_names: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Region-query outputs (methods with region heads, e.g. GRAIN), one dict per image:
        ``embeddings`` (Q, E) normalised, ``boxes`` (Q, 4) normalised xyxy, and with
        ``class_names`` the best ``labels`` (Q,) and their cosine ``scores`` (Q,)."""
        if not self.method.has_regions:
            raise ValueError(
                f"method '{self.name}' has no region head (regions() needs e.g. grain)"
            )
        x = self.images(image)
        emb = self.method.region_embeddings(x)  # (B, Q, E)
        boxes = (
            self.method.predict_boxes(x) if "predict_boxes" in self.method.capabilities() else None
        )
        out = []
        for b in range(x.shape[0]):
            item: dict[str, Any] = {"embeddings": emb[b]}
            if boxes is not None:
                item["boxes"] = boxes[b]
            if class_names:
                owner = torch.arange(len(class_names), device=self.device)
                cls = self._class_embeddings(list(class_names), owner, len(class_names))
                item["scores"], idx = (emb[b].float() @ cls.t()).max(-1)
                item["labels"] = [class_names[i] for i in idx.tolist()]
            out.append(item)
        return out
