"""2 gloo processes on CPU == 1 process on the joined batch (loss and gradients)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from finegrain.losses.contrastive import clip_loss, multi_positive_sigmoid_loss, siglip_loss
from finegrain.losses.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    ring_pass,
    world_info,
)

pytestmark = pytest.mark.distributed

WORLD, B, K, D = 2, 3, 2, 8

CASES = {
    "clip_local": lambda i, t, s, b: clip_loss(i, t, s, local_loss=True, gather=True),
    "clip_full": lambda i, t, s, b: clip_loss(i, t, s, local_loss=False, gather=True),
    "siglip_ring": lambda i, t, s, b: siglip_loss(i, t, s, b, exchange="ring"),
    "siglip_gather": lambda i, t, s, b: siglip_loss(i, t, s, b, exchange="gather"),
    "multi_ring": lambda i, t, s, b: multi_positive_sigmoid_loss(i, t, s, b, exchange="ring"),
    "multi_gather": lambda i, t, s, b: multi_positive_sigmoid_loss(i, t, s, b, exchange="gather"),
}
# edge cases: one sample per rank; the same caption on both ranks (a cross-rank duplicate)
CASES |= {f"{name}_b1": CASES[name] for name in ("clip_local", "siglip_ring", "multi_ring")}
CASES |= {f"{name}_dup": CASES[name] for name in ("clip_local", "siglip_ring")}


def _local_batch(case: str) -> int:
    return 1 if case.endswith("_b1") else B


def _data(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float64, so that 2 ranks == 1 process holds to 1e-10 whatever the machine's kernels."""
    g = torch.Generator().manual_seed(list(CASES).index(case))
    n = WORLD * _local_batch(case)
    image = torch.nn.functional.normalize(
        torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1
    )
    shape = (n, K, D) if case.startswith("multi") else (n, D)
    text = torch.nn.functional.normalize(
        torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1
    )
    if case.endswith("_dup"):
        text[B] = text[0]  # rank 1's first caption == rank 0's first caption
    return image, text


def _run(case: str, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
    image = image.clone().requires_grad_(True)
    text = text.clone().requires_grad_(True)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    loss = CASES[case](image, text, scale, bias)
    loss.backward()
    out = {"loss": loss.detach(), "image": image.grad, "text": text.grad, "scale": scale.grad}
    if bias.grad is not None:
        out["bias"] = bias.grad
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        results: dict[str, object] = {"world_info": world_info()}
        x = torch.arange(4.0).reshape(2, 2) + 10 * rank
        x.requires_grad_(True)
        g = all_gather_with_grad(x)
        (g * (rank + 1)).sum().backward()  # d/dx on rank r = sum over ranks of (s + 1)
        results["gather"] = g.detach()
        results["gather_grad"] = x.grad
        results["gather_nograd"] = all_gather_no_grad(x)
        results["ring"] = ring_pass(x.detach())
        for case in CASES:
            image, text = _data(case)
            b = _local_batch(case)
            sl = slice(rank * b, (rank + 1) * b)
            results[case] = _run(case, image[sl], text[sl])
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_world_info_single_process() -> None:
    assert world_info() == (0, 1)
    x = torch.randn(2, 3)
    assert all_gather_with_grad(x) is x
    assert ring_pass(x) is x


def test_primitives(ranks: list[dict]) -> None:
    assert [r["world_info"] for r in ranks] == [(0, 2), (1, 2)]
    expected = torch.cat([torch.arange(4.0).reshape(2, 2) + 10 * r for r in range(WORLD)])
    for r in ranks:
        torch.testing.assert_close(r["gather"], expected)
        torch.testing.assert_close(r["gather_nograd"], expected)
        # every rank's loss weights the gathered tensor by (s + 1): summed grad is 1 + 2 = 3
        torch.testing.assert_close(r["gather_grad"], torch.full((2, 2), 3.0))
    torch.testing.assert_close(ranks[0]["ring"], expected[2:])  # rank 0 receives from rank 1
    torch.testing.assert_close(ranks[1]["ring"], expected[:2])


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_joined_batch(ranks: list[dict], case: str) -> None:
    image, text = _data(case)
    ref = _run(case, image, text)
    per_rank = [r[case] for r in ranks]
    # DDP averages over ranks: mean of local losses == joined loss, same for gradients.
    mean_loss = torch.stack([r["loss"] for r in per_rank]).mean()
    torch.testing.assert_close(mean_loss, ref["loss"], rtol=1e-10, atol=1e-12)
    for name in ("image", "text"):
        joined = torch.cat([r[name] for r in per_rank]) / WORLD
        torch.testing.assert_close(joined, ref[name], rtol=1e-10, atol=1e-12)
    for name in ("scale", "bias"):
        if name in ref:
            avg = torch.stack([r[name] for r in per_rank]).mean()
            torch.testing.assert_close(avg, ref[name], rtol=1e-10, atol=1e-12)
