"""Contrastive losses vs naive loop references written from the papers' equations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finegrain.losses.contrastive import clip_loss, multi_positive_sigmoid_loss, siglip_loss


def _feats(b: int, d: int = 6, k: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    shape = (b, d) if k is None else (b, k, d)
    return image, F.normalize(torch.randn(*shape, generator=g), dim=-1)


def naive_clip(image, text, t) -> float:
    """CLIP: 1/2 (-1/N Σ_i log e^{t x_i.y_i}/Σ_j e^{t x_i.y_j} - 1/N Σ_j log e^{t x_j.y_j}/Σ_i e^{t x_i.y_j})."""
    n = image.shape[0]
    sim = [[float(image[i] @ text[j]) * t for j in range(n)] for i in range(n)]
    i2t = -sum(sim[i][i] - math.log(sum(math.exp(sim[i][j]) for j in range(n))) for i in range(n))
    t2i = -sum(sim[j][j] - math.log(sum(math.exp(sim[i][j]) for i in range(n))) for j in range(n))
    return 0.5 * (i2t + t2i) / n


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > -30 else x


def naive_siglip(image, text, t, b) -> float:
    """SigLIP Eq. 1: -1/|B| Σ_i Σ_j log σ(z_ij (t x_i.y_j + b))."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += log_sigmoid(z * (t * float(image[i] @ text[j]) + b))
    return -total / n


def naive_multi(image, text, t, b) -> float:
    n, k, _ = text.shape
    total = 0.0
    for i in range(n):
        for j in range(n):
            for c in range(k):
                z = 1.0 if i == j else -1.0
                total += log_sigmoid(z * (t * float(image[i] @ text[j, c]) + b))
    return -total / n


@pytest.mark.parametrize("b", [1, 2, 5])
def test_clip_matches_naive(b: int) -> None:
    image, text = _feats(b)
    got = clip_loss(image, text, 10.0)
    assert got.item() == pytest.approx(naive_clip(image, text, 10.0), rel=1e-5, abs=1e-6)


def test_clip_batch_of_one_is_zero_and_duplicates() -> None:
    image, text = _feats(1)
    assert clip_loss(image, text, 30.0).item() == pytest.approx(0.0, abs=1e-6)
    # duplicate captions: two images share the same text; the reference still uses the diagonal
    image, text = _feats(4)
    text = text.clone()
    text[1] = text[0]
    got = clip_loss(image, text, 5.0).item()
    assert got == pytest.approx(naive_clip(image, text, 5.0), rel=1e-5)
    assert got > math.log(4) * 0.5  # the duplicate pair can never be separated


@pytest.mark.parametrize("b", [1, 3, 6])
def test_siglip_matches_naive(b: int) -> None:
    image, text = _feats(b, seed=b)
    for exchange in ("ring", "gather"):
        got = siglip_loss(image, text, 10.0, -10.0, exchange=exchange)
        assert got.item() == pytest.approx(naive_siglip(image, text, 10.0, -10.0), rel=1e-5)


def test_siglip_duplicates_and_tensor_params() -> None:
    image, text = _feats(3)
    text = torch.stack([text[0], text[0], text[2]])
    t = torch.tensor(math.log(10.0), requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)
    got = siglip_loss(image, text, t.exp(), b)
    assert got.item() == pytest.approx(naive_siglip(image, text, 10.0, -10.0), rel=1e-5)
    got.backward()
    assert t.grad is not None and b.grad is not None and torch.isfinite(b.grad)


@pytest.mark.parametrize("b,k", [(1, 1), (1, 3), (4, 2)])
def test_multi_positive_matches_naive(b: int, k: int) -> None:
    image, text = _feats(b, k=k, seed=b + k)
    got = multi_positive_sigmoid_loss(image, text, 7.0, -3.0)
    assert got.item() == pytest.approx(naive_multi(image, text, 7.0, -3.0), rel=1e-5)


def test_multi_positive_with_one_caption_is_siglip() -> None:
    image, text = _feats(5)
    a = multi_positive_sigmoid_loss(image, text[:, None], 4.0, -1.0)
    torch.testing.assert_close(a, siglip_loss(image, text, 4.0, -1.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu_close_to_fp32(dtype: torch.dtype) -> None:
    image, text = _feats(8, d=32)
    ref_clip = clip_loss(image, text, 20.0)
    ref_sig = siglip_loss(image, text, 10.0, -10.0)
    mimage, mtext = _feats(8, d=32, k=3)
    ref_multi = multi_positive_sigmoid_loss(mimage, mtext, 10.0, -5.0)
    with torch.autocast("cpu", dtype=dtype):
        got_clip = clip_loss(image, text, 20.0)
        got_sig = siglip_loss(image, text, 10.0, -10.0)
        got_multi = multi_positive_sigmoid_loss(mimage, mtext, 10.0, -5.0)
    for got, ref in ((got_clip, ref_clip), (got_sig, ref_sig), (got_multi, ref_multi)):
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(ref.item(), rel=3e-2)


def test_gradients_match_naive_autograd() -> None:
    image, text = _feats(4)
    a = image.clone().requires_grad_(True)
    clip_loss(a, text, 10.0).backward()
    b = image.clone().requires_grad_(True)
    logits = 10.0 * b @ text.t()
    labels = torch.arange(4)
    (0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_bad_input() -> None:
    image, text = _feats(3)
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(image, text[:, :4], 1.0)
    with pytest.raises(ValueError, match="ring, gather"):
        siglip_loss(image, text, 1.0, 0.0, exchange="allreduce")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(B, K, D\)"):
        multi_positive_sigmoid_loss(image, text, 1.0, 0.0)
