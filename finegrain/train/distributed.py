"""Process-group setup and model wrapping; the only distributed code outside ``losses``.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR`` set, including
multi-node runs with ``--rdzv-backend c10d``) the default process group is initialised with
``nccl`` on GPU and ``gloo`` on CPU. Without those variables everything is single-process.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.constants import default_pg_timeout


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA exists, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but CUDA is not available; use train.device=cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Initialise the default process group from torchrun's environment (idempotent).

    ``timeout_s`` bounds every collective: a rank that hangs (or dies without torchrun
    noticing) makes the others fail with a timeout instead of waiting forever. Joining the
    group gets ``JOIN_GRACE_S`` more before ``join_within`` ends the rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s) if timeout_s else default_pg_timeout
        kwargs: dict = {"device_id": dev} if dev.type == "cuda" else {}

        def join() -> None:
            store = attempt_store(timeout)
            if store is not None:
                kwargs.update(store=store, rank=rank, world_size=world)
            dist.init_process_group(backend=backend, timeout=timeout, **kwargs)

        join_within(timeout.total_seconds() + JOIN_GRACE_S, join, rank)
        global _JOINED
        _JOINED = True
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


JOIN_GRACE_S = 60.0  # past the process group's own timeout, before the watchdog ends the rank


def join_within(limit_s: float, join: Callable[[], None], rank: int | str = "?") -> None:
    """Run ``join`` (process-group setup); if it has not returned after ``limit_s`` seconds,
    print one line and end the process with exit code 2 (torchrun then restarts or ends the job).

    torch's timeout does not bound every setup hang: with stale store keys (see
    ``attempt_store``) a restarted gloo rank that read its peer's old address most often failed
    with "Connection refused" at the timeout, but once was still in setup 4 minutes into a 60 s
    ``timeout`` (torch 2.14.1, CPU). A rank stuck there cannot raise, so a timer thread ends
    it rather than let the job hang."""

    def give_up() -> None:
        print(f"finegrain train: error: rank {rank}: could not join the process group within "
              f"{limit_s:g}s (train.timeout_s + {JOIN_GRACE_S:g}s); check that every rank "
              "started and can reach MASTER_ADDR:MASTER_PORT", file=sys.stderr, flush=True)  # fmt: skip
        os._exit(2)

    timer = threading.Timer(limit_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        join()
    finally:
        timer.cancel()


def attempt_store(timeout: timedelta) -> dist.Store | None:
    """The process group's store under torchrun, scoped to this restart attempt; None (plain
    ``env://``) when torchrun's agent does not host the store.

    Since torch 2.4 the c10d rendezvous shares one agent-hosted ``TCPStore`` with the workers
    (``TORCHELASTIC_USE_AGENT_STORE=True``), and in this torch it outlives a restart: same
    ``MASTER_PORT``, keys of the killed attempt still there. ``init_process_group`` writes
    every attempt's keys under the same names, so after ``--max-restarts`` a rank that reaches
    gloo's (or NCCL's) rendezvous before its peer reads the peer's *previous* address and
    fails in ``connectFullMesh`` ("Connection refused" at the timeout) or hangs past it. Seen
    in the store's trace (``TORCH_CPP_LOG_LEVEL=INFO``): restarted rank 0 read
    ``default_pg/0//cpu//0/1`` 0.8 s before restarted rank 1 wrote it; 5 of 7 restarts failed
    so (pytorch/pytorch#135712 reports it with NCCL). A ``TORCHELASTIC_RESTART_COUNT`` prefix
    gives each attempt its own keys (what torch did itself up to 2.3). That count is kept per
    agent: on several nodes, where agents can restart a different number of times, launch
    with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (rank 0 then hosts a fresh store each
    attempt and this function returns None)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    several_nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
    if several_nodes and restarts and os.environ.get("RANK", "0") == "0":
        print("finegrain: torchrun shares one store across restarts and counts them per node; "
              "launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so that every node can rejoin "
              "after a restart", file=sys.stderr, flush=True)  # fmt: skip
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    client = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"finegrain/attempt_{attempt}", client)


_JOINED = False  # this process set up a process group (see ``end_worker``)


def end_worker(code: int) -> None:
    """End a torchrun worker that set up a process group with ``code``, skipping the
    interpreter's teardown; a no-op (returns) in a process that never joined one.

    Under FSDP2 ``destroy_process_group`` leaves gloo's worker threads running (torch 2.14.1:
    DTensor's caches keep the device mesh, and with it the group, alive), so they were still
    there at interpreter finalization, where gloo releasing tensors that hold Python objects
    can abort the process ("terminate called without an active exception", SIGABRT; twice in
    about a dozen CI runs, each time a 2-rank FSDP job that had finished and written
    everything; pytorch/pytorch#179291 describes the mechanism). Every result is on disk by then, so the
    worker flushes its streams and logs and leaves with ``os._exit``: no finalization, no
    abort, and torchrun sees the real exit code."""
    if not _JOINED:
        return
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap_ddp(method: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around the method (its ``forward`` is features + loss)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.local_rank] if info.device.type == "cuda" else None
    return DDP(method, device_ids=ids, broadcast_buffers=False)


def shard_fsdp(method: nn.Module, info: DistInfo, mixed_bf16: bool = False) -> nn.Module:
    """FSDP2 (``fully_shard``) of ``method.fsdp_units()``: by default every transformer block,
    then each tower; a method's ``frozen_modules`` (EMA teachers) stay whole on every rank.

    The method's own parameters (projections, the 0-d logit scale that ``fully_shard`` refuses)
    stay replicated; the trainer all-reduces their gradients (``unsharded_params``). Towers are
    the modules holding the bulk of the parameters, which is what FSDP is for.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kwargs: dict = {"mesh": mesh}
    if mixed_bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for unit in method.fsdp_units():  # blocks first, then towers; never frozen modules
        if _shardable(unit):
            fully_shard(unit, **kwargs)
    return method


def _shardable(module: nn.Module) -> bool:
    params = [p for p in module.parameters() if p.requires_grad]
    return bool(params) and all(p.dim() > 0 for p in module.parameters())


def unsharded_params(method: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters that are not FSDP DTensors (replicated across ranks)."""
    from torch.distributed.tensor import DTensor

    return [p for p in method.parameters() if p.requires_grad and not isinstance(p, DTensor)]


def broadcast_params(params: list[nn.Parameter]) -> None:
    """Make replicated parameters identical on every rank (rank 0 wins)."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, 0)


def all_reduce_grads(params: list[nn.Parameter], world_size: int) -> None:
    """Average gradients across ranks (used with exact accumulation, which bypasses DDP)."""
    if world_size <= 1 or not params:
        return
    for p in params:  # every rank must send the same layout, even for unused parameters
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def all_reduce_max(value: float, device: torch.device) -> float:
    """Max of a float over ranks (e.g. a non-finite-loss flag) so all ranks agree."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Key-wise sum of a dict of floats over ranks (keys may differ between ranks);
    collective, the identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(values)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(values))
    total: dict[str, float] = {}
    for d in gathered:
        for k, v in d.items():
            total[k] = total.get(k, 0.0) + float(v)
    return total


def optimizer_state(method: nn.Module, optimizer: torch.optim.Optimizer, full: bool) -> dict:
    """The optimizer state to checkpoint; ``full`` gathers FSDP shards (collective)."""
    if not full:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(method, optimizer, options=opts)


def load_optimizer_state(
    method: nn.Module, optimizer: torch.optim.Optimizer, state: dict, full: bool
) -> None:
    """Inverse of ``optimizer_state``; ``full`` re-shards a full state onto FSDP parameters."""
    if not full:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_optimizer_state_dict(method, optimizer, state, options=opts)
