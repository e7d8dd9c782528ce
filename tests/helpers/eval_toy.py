"""Tiny deterministic methods and fixture data for the evaluation tests (no training, no
downloads). Images are coloured squares; the toy towers embed a patch by a fixed projection of
its mean colour and a colour word by the same projection of that colour, so retrieval and
classification by colour are partly right (several images share a colour) and segmentation of
coloured shapes works."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from finegrain.data.config import DataConfig
from finegrain.encoders.base import ImageTowerConfig
from finegrain.methods.base import Method, MethodConfig

COLORS = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 230),
    "yellow": (240, 230, 20),
    "purple": (150, 30, 190),
    "white": (245, 245, 245),
}
VOCAB, LEN, DIM, PATCH = 512, 12, 16, 8


@dataclass
class ToyConfig(MethodConfig):
    name: str = "toy"
    image: ImageTowerConfig = field(default_factory=lambda: ImageTowerConfig(image_size=32))
    embed_dim: int = DIM


def word_id(w: str) -> int:
    return 1 + zlib.crc32(w.lower().strip(".,").encode()) % (VOCAB - 1)


class ToyMethod(Method):
    """Global toy: image = projection of mean colour + a little random pixel projection;
    text = mean of word embeddings where colour words sit on their colour's projection."""

    Config = ToyConfig

    def __init__(self, cfg: ToyConfig | None = None) -> None:
        super().__init__(cfg or ToyConfig())
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(3, DIM, generator=g))  # colour -> embedding
        self.noise = nn.Parameter(0.05 * torch.randn(3 * PATCH * PATCH, DIM, generator=g))
        emb = 0.3 * torch.randn(VOCAB, DIM, generator=g)
        d = DataConfig()
        mean, std = torch.tensor(d.mean), torch.tensor(d.std)
        for name, rgb in COLORS.items():
            c = (torch.tensor(rgb) / 255.0 - mean) / std
            emb[word_id(name)] = 3.0 * (c @ self.proj.data)
        emb[0] = 0
        self.word = nn.Parameter(emb)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), LEN, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [word_id(w) for w in t.split()][:LEN]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, D) per-patch embeddings on a (H/8, W/8) grid."""
        patches = F.unfold(images, PATCH, stride=PATCH).transpose(1, 2)  # (B, N, 3*P*P)
        b, n, _ = patches.shape
        mean_rgb = patches.reshape(b, n, 3, PATCH * PATCH).mean(-1)  # (B, N, 3)
        return mean_rgb @ self.proj + patches @ self.noise  # (B, N, D)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.patch_tokens(images).mean(1)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        mask = (tokens != 0).float()[..., None]
        x = (self.word[tokens] * mask).sum(1) / mask.sum(1).clamp_min(1)
        return F.normalize(x, dim=-1) if normalize else x

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        tok = self.patch_tokens(images)  # (B, N, D)
        b, n, d = tok.shape
        h = images.shape[-2] // PATCH
        return tok.transpose(1, 2).reshape(b, d, h, n // h)

    def region_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 4, D): the four quadrants' mean patch embedding, normalised."""
        m = self.dense_features(images)
        b, d, h, w = m.shape
        q = F.adaptive_avg_pool2d(m, 2).reshape(b, d, 4).transpose(1, 2)
        return F.normalize(q, dim=-1)


class PlainToy(ToyMethod):
    """No dense features, regions or conditioned scoring (for capability errors)."""

    dense_features = Method.dense_features
    region_embeddings = Method.region_embeddings


class ConditionedToy(ToyMethod):
    """FLAIR-like text-conditioned attention pooling over patch tokens:
    w_n(t) = softmax_n(<k_n, t> / tau), v(t) = normalize(sum_n w_n v_n), s = <v(t), t>."""

    tau = 0.5

    def image_features_for_scoring(self, images: torch.Tensor) -> torch.Tensor:
        return self.patch_tokens(images)  # (B, N, D)

    def text_features_for_scoring(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_text(tokens)  # (T, D)

    def score_features(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        att = torch.einsum("bnd,td->btn", image_feats, text_feats) / self.tau  # (B, T, N)
        pooled = torch.einsum("btn,bnd->btd", att.softmax(-1), image_feats)  # (B, T, D)
        return (F.normalize(pooled, dim=-1) * text_feats[None]).sum(-1)  # (B, T)


def naive_conditioned(
    m: ConditionedToy, image_feats: torch.Tensor, text_feats: torch.Tensor
) -> torch.Tensor:
    """The same score as a double loop over pairs (reference)."""
    out = torch.empty(image_feats.shape[0], text_feats.shape[0])
    for i in range(image_feats.shape[0]):
        for t in range(text_feats.shape[0]):
            a = (image_feats[i] @ text_feats[t] / m.tau).softmax(0)  # (N,)
            v = F.normalize((a[:, None] * image_feats[i]).sum(0), dim=0)
            out[i, t] = v @ text_feats[t]
    return out


def color_image(color: str, size: int = 32, seed: int = 0, shape: str = "full") -> Image.Image:
    """A coloured square on a noisy grey background (or a full-frame colour)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(90, 140, (size, size, 3), dtype=np.uint8)
    rgb = np.array(COLORS[color], dtype=np.uint8)
    if shape == "full":
        arr[:] = np.clip(rgb.astype(int) + rng.integers(-10, 10, (size, size, 3)), 0, 255)
    else:
        arr[: size // 2, : size // 2] = rgb
    return Image.fromarray(arr)


def color_scene(colors: list[str], size: int = 32) -> tuple[Image.Image, np.ndarray]:
    """Quadrant i painted with colors[i] (None = background); mask 1 + COLORS index."""
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.int64)
    names = list(COLORS)
    h = size // 2
    for q, c in enumerate(colors):
        if c is None:
            continue
        ys, xs = (q // 2) * h, (q % 2) * h
        arr[ys : ys + h, xs : xs + h] = COLORS[c]
        mask[ys : ys + h, xs : xs + h] = 1 + names.index(c)
    return Image.fromarray(arr), mask


def register_toy() -> None:
    """Make ``method.name=toy`` loadable by ``finegrain.checkpoint.load_run``."""
    from finegrain.registry import METHODS

    try:
        METHODS.add("toy", ToyMethod)
    except ValueError:  # already registered by another test
        pass
