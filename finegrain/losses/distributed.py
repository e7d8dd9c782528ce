"""Cross-rank communication for contrastive losses: the ONE place finegrain talks across ranks.

Every function is the identity (or a no-op) when ``torch.distributed`` is not initialised or
the world has one rank, so method code is written for a single device and stays correct
under data parallelism.

Gradient convention (the one OpenCLIP's ``--gather-with-grad`` and DDP rely on): every rank
computes its own loss ``L_r`` from its local rows against features gathered from all ranks,
and autograd sends the gradient of *every* rank's loss back to the rank that produced a
feature (a sum over ranks). DDP then averages parameter gradients over ranks, so the update
is the gradient of ``mean_r L_r``, which equals the loss of one process on the joined batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not available or initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_list(x: torch.Tensor) -> list[torch.Tensor]:
    _, world = world_info()
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concat of every rank's ``x`` (rank order). Backward: the gradient of the
    gathered tensor is summed over ranks (all_reduce) and each rank keeps its own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, _ = world_info()
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(_gather_list(x), dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def _check_equal_batches(x: torch.Tensor) -> None:
    """all_gather needs the same shape on every rank; fail with a clear message otherwise."""
    _, world = world_info()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_ = [int(s.item()) for s in sizes]
    if len(set(sizes_)) != 1:
        raise ValueError(f"all ranks must have the same local batch size, got {sizes_}")


def all_gather_with_grad(x: torch.Tensor, check_sizes: bool = False) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...) on every rank, in rank order, with gradient.

    The gradient that reaches rank r's ``x`` is the sum over all ranks of the gradient of
    their losses w.r.t. rank r's slice. Identity when world == 1.
    """
    _, world = world_info()
    if world == 1:
        return x
    if check_sizes:
        _check_equal_batches(x)
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (world * B, ...) without gradient (features of other ranks as constants)."""
    _, world = world_info()
    if world == 1:
        return x
    return torch.cat(_gather_list(x.detach()), dim=0)


def gather_features(x: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """All ranks' features; with ``with_grad=False`` the local slice keeps its gradient
    (OpenCLIP's behaviour without ``--gather-with-grad``), the others are constants."""
    rank, world = world_info()
    if world == 1:
        return x
    if with_grad:
        return all_gather_with_grad(x)
    parts = list(all_gather_no_grad(x).chunk(world, dim=0))
    parts[rank] = x
    return torch.cat(parts, dim=0)


def _exchange(x: torch.Tensor, to_rank: int, from_rank: int) -> torch.Tensor:
    """Send ``x`` to ``to_rank`` and receive a tensor of the same shape from ``from_rank``."""
    recv = torch.empty_like(x)
    ops = [
        dist.P2POp(dist.isend, x.contiguous(), to_rank),
        dist.P2POp(dist.irecv, recv, from_rank),
    ]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return recv


class _NeighbourExchange(torch.autograd.Function):
    """Forward: send to ``to_rank``, receive from ``from_rank``. Backward: the reverse trip,
    so the gradient of the received tensor goes back to the rank that sent it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, to_rank: int, from_rank: int) -> torch.Tensor:  # type: ignore[override]
        ctx.to_rank, ctx.from_rank = to_rank, from_rank
        return _exchange(x, to_rank, from_rank)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _exchange(grad, ctx.from_rank, ctx.to_rank), None, None


def neighbour_exchange_with_grad(x: torch.Tensor, to_rank: int, from_rank: int) -> torch.Tensor:
    """Point-to-point exchange with gradient (big_vision / OpenCLIP chunked sigmoid loss)."""
    _, world = world_info()
    if world == 1:
        return x
    return _NeighbourExchange.apply(x, to_rank, from_rank)


def ring_pass(x: torch.Tensor) -> torch.Tensor:
    """One step of the ring: send to rank+1, receive from rank-1 (with gradient).

    After ``s`` calls a rank holds the tensor that rank ``rank - s`` started with, so
    ``world - 1`` calls visit every other rank's block while only one block is held at a time.
    """
    rank, world = world_info()
    if world == 1:
        return x
    return neighbour_exchange_with_grad(x, (rank + 1) % world, (rank - 1) % world)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor, count: int) -> torch.Tensor:
    """Mean over every rank's samples: ``sum_r x_r / sum_r count_r`` where ``x`` is this rank's
    *sum* over its ``count`` samples (DINO/iBOT centring over the global batch). No gradient."""
    _, world = world_info()
    total = torch.tensor([float(count)], device=x.device, dtype=torch.float64)
    s = x.detach().clone()
    if world > 1:
        dist.all_reduce(s, op=dist.ReduceOp.SUM)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return s / total.to(s.dtype)
