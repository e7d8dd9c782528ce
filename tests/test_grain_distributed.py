"""GRAIN's gathered region-description loss: 2 gloo ranks == 1 process on the joined slots
(mean of the rank losses and the summed gradients), including duplicates across ranks."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from finegrain.losses.matching import num_boxes_over_ranks
from finegrain.losses.region import region_description_loss

pytestmark = pytest.mark.distributed

WORLD, N, D = 2, 6, 8


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    texts = torch.tensor([1, 2, 3, 1, 4, 5, 6, 2, 7, 1, 8, 9])  # duplicates within and across ranks
    valid = torch.ones(WORLD * N, dtype=torch.bool)
    valid[[5, 11]] = False
    matched = valid.clone()
    matched[[2, 8]] = False  # same count of matched slots per rank: 4 and 4
    return {
        # float64: 2 ranks == 1 process to 1e-10 whatever the machine's kernels
        "regions": F.normalize(torch.randn(WORLD * N, D, generator=g, dtype=torch.float64), dim=-1),
        "descs": F.normalize(torch.randn(WORLD * N, D, generator=g, dtype=torch.float64), dim=-1),
        "matched": matched, "valid": valid, "tokens": texts[:, None].repeat(1, 3),
    }  # fmt: skip


def _run(
    d: dict[str, torch.Tensor], sl: slice, gather: bool, symmetric: bool
) -> dict[str, torch.Tensor]:
    r = d["regions"][sl].clone().requires_grad_(True)
    t = d["descs"][sl].clone().requires_grad_(True)
    loss = region_description_loss(r, t, d["matched"][sl], d["valid"][sl], 5.0, d["tokens"][sl],
                                   dedup=True, symmetric=symmetric, gather=gather)  # fmt: skip
    loss.backward()
    return {"loss": loss.detach(), "r": r.grad, "t": t.grad}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        d = _data()
        sl = slice(rank * N, (rank + 1) * N)
        res = {sym: _run(d, sl, True, sym) for sym in (False, True)}
        res["num_boxes"] = num_boxes_over_ranks(float(rank * 2 + 3))  # 3 and 5 -> 4
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gathered_region_loss_equals_single_process(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert ranks[0]["num_boxes"].item() == pytest.approx(4.0)
    d = _data()
    for sym in (False, True):
        ref = _run(d, slice(0, WORLD * N), False, sym)
        # each rank averages its own 4 rows; equal counts -> the mean over ranks is the full loss
        mean = sum(r[sym]["loss"] for r in ranks) / WORLD
        assert mean.item() == pytest.approx(ref["loss"].item(), rel=1e-10)
        # DDP averages gradients over ranks: (sum of rank grads) / WORLD == grad of the full loss
        for k in ("r", "t"):
            got = torch.cat([r[sym][k] for r in ranks]) / WORLD
            assert torch.allclose(got, ref[k], rtol=1e-10, atol=1e-12), (sym, k)
