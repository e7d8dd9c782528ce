"""``guard.grads_finite`` (the trainer's non-finite gradient check) with torch's public max-norm."""

from __future__ import annotations

import math

import pytest
import torch

from finegrain.train.guard import grads_finite


def _params(*grads: torch.Tensor | None) -> list[torch.nn.Parameter]:
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(3) if g is None else torch.zeros_like(g))
        p.grad = g
        out.append(p)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "bad, finite", [(None, True), (math.nan, False), (math.inf, False), (-math.inf, False)]
)
def test_grads_finite(bad, finite, dtype):  # mixed dtypes in one list, as under bf16 params
    g = torch.randn(4, 5).to(dtype)
    if bad is not None:
        g[2, 3] = bad
    assert grads_finite(_params(torch.ones(3), g, None)) is finite


def test_large_finite_gradients_are_finite():
    # 1e30 is finite in float32 though its squares are not: a 2-norm check called it inf
    assert grads_finite(_params(torch.full((8,), 1e30), torch.ones(2)))


def test_no_gradients_is_finite():
    assert grads_finite([]) and grads_finite(_params(None, None))


def test_empty_shard_is_skipped():
    # an FSDP rank can hold an empty gradient shard: the inf-norm of an empty tensor is an error
    assert grads_finite(_params(torch.zeros(0), torch.ones(2)))
    assert not grads_finite(_params(torch.zeros(0), torch.tensor([1.0, math.nan])))
    assert grads_finite(_params(torch.zeros(0)))


@pytest.mark.parametrize("bad, finite", [(None, True), (math.nan, False), (math.inf, False)])
def test_fallback_without_get_total_norm(bad, finite, monkeypatch):
    # torch < 2.6 (the declared floor is 2.3) has no torch.nn.utils.get_total_norm
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    g = torch.randn(4, 5)
    if bad is not None:
        g[1, 1] = bad
    assert grads_finite(_params(torch.zeros(0), torch.ones(3), g)) is finite
