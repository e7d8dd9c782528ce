"""FLAIR pooling and losses against naive references written from the paper's equations."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from finegrain.heads.pooling import (
    AttentionPool,
    TextConditionedPooling,
    max_pool,
    mean_pool,
    pool_tokens,
)
from finegrain.losses.flair import (
    flair_multi_positive_loss,
    pair_offsets,
    text_conditioned_sigmoid_loss,
)

D, H, N = 16, 4, 6


def _mha_reference(
    pool: TextConditionedPooling, text: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """The released block: nn.MultiheadAttention(add_zero_attn) on LayerNormed q, k, v."""
    return pool.attn(pool.ln_q(text), pool.ln_k(tokens), pool.ln_v(tokens), need_weights=False)[0]


def _manual_zero_slot(
    pool: TextConditionedPooling, text: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """Multi-head attention written out, with a zero key/value appended after projection."""
    w, b = pool.attn.in_proj_weight, pool.attn.in_proj_bias
    q = F.linear(pool.ln_q(text), w[:D], b[:D])  # (B, M, D)
    k = F.linear(pool.ln_k(tokens), w[D : 2 * D], b[D : 2 * D])  # (B, N, D)
    v = F.linear(pool.ln_v(tokens), w[2 * D :], b[2 * D :])
    k = torch.cat([k, torch.zeros_like(k[:, :1])], 1)  # (B, N+1, D)
    v = torch.cat([v, torch.zeros_like(v[:, :1])], 1)
    dh = D // H
    heads = []
    for h in range(H):
        sl = slice(h * dh, (h + 1) * dh)
        att = (q[..., sl] @ k[..., sl].transpose(1, 2) / dh**0.5).softmax(-1)  # (B, M, N+1)
        heads.append(att @ v[..., sl])
    return pool.attn.out_proj(torch.cat(heads, -1))


def test_pooling_matches_mha_and_manual_zero_slot() -> None:
    pool = TextConditionedPooling(D, heads=H)
    text, tokens = torch.randn(3, 5, D), torch.randn(3, N, D)
    out = pool(text, tokens)
    assert out.shape == (3, 5, D)
    torch.testing.assert_close(out, _mha_reference(pool, text, tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, _manual_zero_slot(pool, text, tokens), rtol=1e-5, atol=1e-5)
    assert pool.attention_weights(text, tokens).shape == (3, 5, N + 1)


def test_zero_slot_absorbs_a_text_that_matches_nothing() -> None:
    torch.manual_seed(0)
    pool = TextConditionedPooling(D, heads=H)
    with torch.no_grad():  # identity projections: logits are LN(text) . LN(token)
        pool.attn.in_proj_weight.copy_(torch.eye(D).repeat(3, 1) * 5.0)
        pool.attn.in_proj_bias.zero_()
    p = torch.randn(D)
    tokens = p + 0.01 * torch.randn(2, N, D)  # every patch looks like p
    text = -p.expand(2, 1, D)  # points away from every patch
    w = pool.attention_weights(text, tokens)  # (2, 1, N+1)
    assert (w[..., -1] > 0.99).all(), w[..., -1]
    torch.testing.assert_close(
        pool(text, tokens), pool.attn.out_proj.bias.expand(2, 1, D), atol=1e-3, rtol=0
    )
    # a matching text attends to the patches, not to the zero slot
    assert (pool.attention_weights(p.expand(2, 1, D), tokens)[..., -1] < 0.01).all()
    # without the slot the mass is forced onto the patches
    no_slot = TextConditionedPooling(D, heads=H, zero_slot=False)
    no_slot.load_state_dict(pool.state_dict())
    w2 = no_slot.attention_weights(text, tokens)
    assert w2.shape == (2, 1, N)
    torch.testing.assert_close(w2.sum(-1), torch.ones(2, 1))


def test_similarity_equals_per_pair_loop() -> None:
    pool = TextConditionedPooling(D, heads=H)
    text, tokens = torch.randn(7, D), torch.randn(5, N, D)
    sim = pool.similarity(text, tokens, max_elements=2 * 7 * D)  # forces chunks of 2 images
    ref = torch.zeros(5, 7)
    for i in range(5):
        for j in range(7):
            pooled = _mha_reference(pool, text[j].view(1, 1, D), tokens[i : i + 1])[0, 0]
            ref[i, j] = F.cosine_similarity(pooled, text[j], dim=0)
    torch.testing.assert_close(sim, ref, rtol=1e-5, atol=1e-5)


def test_generic_pooling_helpers() -> None:
    x = torch.randn(2, 4, D)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    torch.testing.assert_close(mean_pool(x, mask)[0], x[0, :2].mean(0))
    torch.testing.assert_close(max_pool(x, mask)[0], x[0, :2].amax(0))
    torch.testing.assert_close(pool_tokens("mean", x[:, 0], x), x.mean(1))
    assert pool_tokens("cls", x[:, 0], x) is not None
    with pytest.raises(ValueError, match="valid choices: cls, mean, max"):
        pool_tokens("avg", x[:, 0], x)
    assert AttentionPool(D, heads=H)(x, mask).shape == (2, D)
    assert AttentionPool(D, heads=H, num_queries=3)(x).shape == (2, 3, D)


def test_pair_offsets_deterministic_and_spread() -> None:
    seeds = torch.arange(40) * 7919 + 3
    off = pair_offsets(seeds, seeds, 8)
    assert off.shape == (40, 40) and off.min() >= 0 and off.max() < 8
    assert len(off.unique()) == 8  # every caption index is used
    torch.testing.assert_close(off, pair_offsets(seeds, seeds, 8))
    torch.testing.assert_close(off[3:5, 10:20], pair_offsets(seeds[3:5], seeds[10:20], 8))


def _lowbias32(x: int) -> int:
    """Wellons' lowbias32 in plain Python integers (the reference for the tensor version)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _pair_offset_ref(a: int, b: int, k: int) -> int:
    def seed32(s: int) -> int:
        u = s & 0xFFFFFFFFFFFFFFFF  # two's complement view of an int64
        return _lowbias32((u & 0xFFFFFFFF) ^ _lowbias32((u >> 32) ^ 0x9E3779B9))

    return _lowbias32((_lowbias32(seed32(a) ^ 0x85EBCA6B) + seed32(b)) & 0xFFFFFFFF) % k


def _additive_fraction(off: torch.Tensor, k: int, n: int = 20000) -> float:
    """Fraction of random 2x2 blocks (i1, i2) x (j1, j2) with
    off[i1,j1] - off[i1,j2] == off[i2,j1] - off[i2,j2] (mod k); 1/k for independent draws."""
    g = torch.Generator().manual_seed(0)
    i = torch.randint(off.shape[0], (n, 2), generator=g)
    j = torch.randint(off.shape[1], (n, 2), generator=g)
    ok = (i[:, 0] != i[:, 1]) & (j[:, 0] != j[:, 1])
    d = (
        off[i[:, 0], j[:, 0]]
        - off[i[:, 0], j[:, 1]]
        - off[i[:, 1], j[:, 0]]
        + off[i[:, 1], j[:, 1]]
    )
    return float((d.remainder(k)[ok] == 0).float().mean())


@pytest.mark.parametrize("kind", ["consecutive", "strided", "random31", "random63"])
def test_pair_offsets_independent_uniform_and_exact(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    seeds = {
        "consecutive": torch.arange(120),
        "strided": torch.arange(120) * 7919 + 3,
        "random31": torch.randint(0, 2**31 - 1, (120,), generator=g),
        "random63": torch.randint(-(2**62), 2**62, (120,), generator=g),
    }[kind]
    k = 8
    off = pair_offsets(seeds, seeds, k)  # (120, 120)
    # the old affine hash gave ~0.67 here; independent draws give 1/k = 0.125
    assert _additive_fraction(off, k) < 0.2
    counts = torch.bincount(off.flatten(), minlength=k).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.1  # ~uniform over the K captions
    for r, c in [(0, 1), (5, 77), (119, 3), (42, 42)]:  # bit-exact vs a plain-integer hash
        assert int(off[r, c]) == _pair_offset_ref(int(seeds[r]), int(seeds[c]), k)


def naive_tcs(pool, tokens, texts, scale, bias, seeds, normalization="released") -> torch.Tensor:
    """L^tcs as loops: image i vs its K captions (+1) and caption c_ij of each j != i (-1)."""
    b, k, _ = texts.shape
    off = pair_offsets(seeds, seeds, k)
    total = torch.zeros(())
    for i in range(b):
        pairs = [(i, c, 1.0) for c in range(k)] + [
            (j, int(off[i, j]), -1.0) for j in range(b) if j != i
        ]
        for j, c, z in pairs:
            t = texts[j, c]
            pooled = _mha_reference(pool, t.view(1, 1, -1), tokens[i : i + 1])[0, 0]
            logit = scale * F.cosine_similarity(pooled, t, dim=0) + bias
            total = total - F.logsigmoid(z * logit)
    return total / (b + k - 1) if normalization == "released" else total / b


def naive_mps(image, texts, scale, bias, normalization="released") -> torch.Tensor:
    """L^mps as loops over (image i, caption k of image j)."""
    b, k, _ = texts.shape
    total = torch.zeros(())
    for i in range(b):
        for j in range(b):
            for c in range(k):
                z = 1.0 if i == j else -1.0
                total = total - F.logsigmoid(z * (scale * image[i] @ texts[j, c] + bias))
    return total / (b * k) if normalization == "released" else total / b


def _leaves(b: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, N, D, generator=g).to(dtype).requires_grad_(True)
    texts = torch.randn(b, k, D, generator=g).to(dtype).requires_grad_(True)
    return tokens, texts


@pytest.mark.parametrize("normalization", ["released", "per_image"])
@pytest.mark.parametrize("b,k", [(4, 3), (1, 2), (3, 1)])
def test_tcs_loss_matches_naive(normalization: str, b: int, k: int) -> None:
    pool = TextConditionedPooling(D, heads=H).double()  # float64: tight on any machine
    seeds = torch.arange(b) * 101 + 5
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    grads = []
    for fn in (text_conditioned_sigmoid_loss, naive_tcs):
        tokens, texts = _leaves(b, k, dtype=torch.float64)
        pool.zero_grad()
        if fn is naive_tcs:
            loss = naive_tcs(pool, tokens, texts, scale, bias, seeds, normalization)
        else:
            loss = fn(
                pool, tokens, texts, scale, bias, pair_seed=seeds, normalization=normalization
            )
        loss.backward()
        grads.append(
            [loss.detach(), tokens.grad, texts.grad, pool.attn.in_proj_weight.grad.clone()]
        )
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("normalization", ["released", "per_image"])
def test_mps_loss_matches_naive(normalization: str) -> None:
    image = F.normalize(torch.randn(4, D), dim=-1)
    texts = F.normalize(torch.randn(4, 3, D), dim=-1)
    got = flair_multi_positive_loss(image, texts, 6.0, -3.0, normalization=normalization)
    torch.testing.assert_close(got, naive_mps(image, texts, 6.0, -3.0, normalization))


def test_bad_inputs_are_clear() -> None:
    pool = TextConditionedPooling(D, heads=H)
    tokens, texts = _leaves(2, 2)
    with pytest.raises(ValueError, match="valid choices: released, per_image"):
        text_conditioned_sigmoid_loss(pool, tokens, texts, 1.0, 0.0, normalization="mean")
    with pytest.raises(ValueError, match="valid choices: gather, ring"):
        text_conditioned_sigmoid_loss(pool, tokens, texts, 1.0, 0.0, exchange="all")
    with pytest.raises(ValueError, match="expected tokens"):
        text_conditioned_sigmoid_loss(pool, tokens, texts[:1], 1.0, 0.0)


# ---- distributed: 2 gloo processes == 1 process on the joined batch --------------------
WORLD, BL, KD = 2, 3, 2


def _dist_case(exchange: str, rows: slice | None) -> dict[str, torch.Tensor]:
    """float64 throughout: 2 ranks == 1 process to 1e-10 on any machine's kernels."""
    torch.manual_seed(0)
    pool = TextConditionedPooling(D, heads=H).double()
    tokens, texts = _leaves(WORLD * BL, KD, seed=1, dtype=torch.float64)
    seeds = torch.arange(WORLD * BL) * 31 + 7
    g_img = F.normalize(
        torch.randn(WORLD * BL, D, generator=torch.Generator().manual_seed(2)), dim=-1
    )
    image = g_img.double().requires_grad_(True)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    sl = rows or slice(None)
    tok, txt, img = tokens[sl], texts[sl], image[sl]
    tcs = text_conditioned_sigmoid_loss(
        pool, tok, txt, scale, bias, pair_seed=seeds[sl], exchange=exchange
    )
    mps = flair_multi_positive_loss(img, F.normalize(txt, dim=-1), scale, bias, exchange="ring")
    loss = (tcs + mps) / 2
    loss.backward()
    return {
        "loss": loss.detach(),
        "tokens": tokens.grad[sl],
        "texts": texts.grad[sl],
        "image": image.grad[sl],
        "scale": scale.grad,
        "bias": bias.grad,
        "pool": pool.attn.in_proj_weight.grad,
        "ln": pool.ln_q.weight.grad,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        rows = slice(rank * BL, (rank + 1) * BL)
        res = {ex: _dist_case(ex, rows) for ex in ("gather", "ring")}
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("exchange", ["gather", "ring"])
def test_two_ranks_equal_joined_batch(tmp_path: Path, exchange: str) -> None:
    if not hasattr(test_two_ranks_equal_joined_batch, "_ranks"):
        mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
        test_two_ranks_equal_joined_batch._ranks = [  # type: ignore[attr-defined]
            torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)
        ]
    ranks = [r[exchange] for r in test_two_ranks_equal_joined_batch._ranks]  # type: ignore[attr-defined]
    ref = _dist_case(exchange, None)
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), ref["loss"])
    for name in ("tokens", "texts", "image"):  # DDP averages: each rank's slice / WORLD
        torch.testing.assert_close(
            torch.cat([r[name] for r in ranks]) / WORLD, ref[name], rtol=1e-10, atol=1e-12
        )
    for name in ("scale", "bias", "pool", "ln"):  # parameters: mean over ranks
        torch.testing.assert_close(
            torch.stack([r[name] for r in ranks]).mean(0), ref[name], rtol=1e-10, atol=1e-12
        )
