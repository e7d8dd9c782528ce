"""Shared benchmark helpers: interleaved timing with warm-up, peak memory, machine info, JSON.

Conventions for every ``benchmarks/bench_*.py`` (used by ``python -m benchmarks``):
- ``main(argv) -> dict`` and ``if __name__ == "__main__"`` printing one JSON document last;
- ``--quick``: a small preset that finishes in about a minute on 2 CPU cores (also the preset
  the runner uses on CPU); ``--device`` defaults to CUDA when available;
- result keys ending in ``_ratio`` are ours / reference: for speeds (samples/s, ours over the
  reference's) higher is better; for step times, memory and overhead fractions lower is better,
  which each script's docstring says;
- every process that imports this module runs with the allocator setting the ``finegrain``
  command uses (``finegrain.runtime``: freed memory retained, glibc), both sides of every
  ratio alike; ``FINEGRAIN_MALLOC=system`` measures under glibc's defaults instead.
  ``machine_info`` records which.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from finegrain.runtime import configure_process

ALLOCATOR = configure_process()  # as the finegrain command: measure what users run


def sync(device: torch.device | str) -> None:
    """Wait for queued device work (CUDA) so wall times cover it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int = 3,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, float]]:
    """Seconds per call of each function, measured round-robin (A, B, A, B, ...) after
    ``warmup`` calls of each, so load changes on a shared machine hit every variant alike.
    Returns {name: {"median_s", "min_s", "mean_s", "cpu_s"}} (cpu_s: process CPU seconds per call,
    meaningful on a loaded machine where wall time is inflated by others)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    out = {}
    for name in fns:
        w = sorted(wall[name])
        out[name] = {
            "median_s": w[len(w) // 2],
            "min_s": w[0],
            "mean_s": sum(w) / len(w),
            "cpu_s": sorted(cpu[name])[len(w) // 2],
        }
    return out


def time_steps(
    fns: dict[str, Callable[[], Any]],
    batch: int,
    repeats: int,
    device: torch.device | str,
    rss_of: Callable[[str], float] | None = None,
) -> dict[str, dict[str, float]]:
    """Training-step closures timed with :func:`time_interleaved` (one warm-up call each),
    per variant {"step_s" (median), "min_step_s", "cpu_s", "samples_per_s"} plus its memory:
    on CUDA "step_peak_mem_mb" (:func:`cuda_step_peak_mb` of one more step); on CPU
    "process_peak_rss_mb" = ``rss_of(name)`` when given (e.g. a fresh process's VmHWM through
    :func:`run_in_subprocess`)."""
    out: dict[str, dict[str, float]] = {}
    for name, t in time_interleaved(fns, repeats=repeats, warmup=1, device=device).items():
        out[name] = {"step_s": t["median_s"], "min_step_s": t["min_s"], "cpu_s": t["cpu_s"],
                     "samples_per_s": batch / t["median_s"]}  # fmt: skip
        if torch.device(device).type == "cuda":
            out[name]["step_peak_mem_mb"] = cuda_step_peak_mb(fns[name])
        elif rss_of is not None:
            out[name]["process_peak_rss_mb"] = rss_of(name)
    return out


def add_variant_args(p: Any, presets: list[str], default: str) -> None:
    """The arguments of a benchmark timing variants of one step (``time_steps``): ``--preset
    --quick --device --precision --repeats --threads --no-memory`` (``p``: an argparse parser;
    ``--quick`` is the caller's to apply)."""
    p.add_argument("--preset", choices=presets, default=default)
    p.add_argument("--quick", action="store_true", help=f"{default} preset, 2 repeats (CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="CUDA only")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the per-variant RSS runs")


def parse_step_args(
    description: str, argv: list[str] | None, steps: int, warmup: int, presets: str
) -> Any:
    """The arguments of a one-method step benchmark: ``--preset {smoke,vitb16} --quick
    --batch-size --steps --warmup --precision --device --threads``; ``--quick`` (the CPU preset)
    means the smoke preset, at most 2 timed steps after 1 warm-up."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", default="smoke", choices=("smoke", "vitb16"), help=presets)
    p.add_argument("--quick", action="store_true", help="smoke preset, 2 steps (CPU preset)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=steps, help="timed steps")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps first")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.warmup = "smoke", min(args.steps, 2), 1
    return args


def build_for_step(
    args: Any, method_config: Callable[[str], Any], make_batch: Callable[..., dict]
) -> tuple[Any, dict, torch.device]:
    """(method in train mode, batch, device) for :func:`parse_step_args`' ``args``: threads
    set, seed 0, ``method_config(args.preset)`` built, ``make_batch(cfg, batch_size, device)``."""
    from finegrain.methods.base import build_method

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = method_config(args.preset)
    batch = make_batch(cfg, args.batch_size, device)
    return build_method(cfg).to(device).train(), batch, device


def step_summary(t: dict[str, float], batch: int, device: torch.device | str) -> dict[str, Any]:
    """A step's :func:`time_interleaved` entry as a result: median step seconds, CPU seconds,
    samples/s and peak memory (:func:`peak_memory_mb`), with :func:`machine_info`."""
    return {"step_s": t["median_s"], "cpu_s": t["cpu_s"], "samples_per_s": batch / t["median_s"],
            "peak_mem_mb": peak_memory_mb(device), "machine": machine_info(device)}  # fmt: skip


def autocast(device: torch.device | str, precision: str = "fp32") -> Any:
    """bf16/fp16 autocast on CUDA; a null context for fp32 and on CPU (benchmarks time fp32
    there)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if torch.device(device).type != "cuda" or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def cuda_step_peak_mb(fn: Callable[[], Any]) -> float:
    """CUDA memory (MB) one call of ``fn`` allocates at its peak on top of what was allocated
    before it (model, optimizer state, inputs)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def train_step(
    loss_fn: Callable[[], torch.Tensor],
    opt: torch.optim.Optimizer,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> Callable[[], None]:
    """One training step as a closure: ``loss_fn()`` under :func:`autocast`, backward,
    optimizer step (gradients cleared first, so a step never sees the previous one's)."""

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = loss_fn()
        loss.backward()
        opt.step()

    return step


def vm_hwm_mb() -> float:
    """This process's peak resident memory (VmHWM) in MB; 0.0 where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def peak_memory_mb(device: torch.device | str) -> float:
    """CUDA: ``max_memory_allocated`` in MB; CPU: the process peak RSS (VmHWM)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return vm_hwm_mb()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a result needs next to it to be comparable: CPU, cores, load, versions, device."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "allocator": {"retained": ALLOCATOR} if ALLOCATOR else "system",
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_json(result: dict[str, Any]) -> None:
    """The one JSON document a benchmark prints (last on stdout, for ``python -m benchmarks``)."""
    print(json.dumps(result, indent=2, sort_keys=False, default=str), flush=True)


def _child(target: Callable[..., Any], args: tuple, queue: Any) -> None:
    queue.put(target(*args))


def run_in_subprocess(target: Callable[..., Any], *args: Any) -> Any:
    """``target(*args)`` in a fresh spawned process, so its peak memory (VmHWM) and threads
    are its own; returns what ``target`` returns (``target`` and ``args`` must pickle: a
    module-level function of the script). A child that dies raises instead of hanging."""
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(target, args, queue))
    proc.start()
    try:
        while True:
            try:
                return queue.get(timeout=5)
            except queue_mod.Empty:
                if not proc.is_alive():
                    name = getattr(target, "__name__", target)
                    raise RuntimeError(
                        f"{name} died in its subprocess (exit {proc.exitcode})"
                    ) from None
    finally:
        proc.join()
