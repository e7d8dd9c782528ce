"""How the contrastive losses scale with world size: per-step time and peak memory of the loss
and its cross-rank exchange (forward + backward), on 1 and on several processes.

    python benchmarks/bench_scaling.py --quick                 # 1 and 2 processes, small sizes
    python benchmarks/bench_scaling.py --worlds 1 2 4 --batch-sizes 128 512 2048

Weak scaling, as in training: ``--batch-sizes`` are *per process* (B), so N processes train on
a global batch of N*B. Every variant runs the real ``finegrain.losses`` function on random
unit-norm features (D = ``--dim``) that require grad, so the step is exactly the loss math plus
the all-gather / ring exchange and their backward. Processes are separate OS processes with one
thread each, joined by ``torch.distributed`` (gloo on CPU, NCCL with ``--device cuda`` when
there are enough GPUs).

Per row: ``time_s`` (median wall seconds per step, slowest rank), ``cpu_s``, ``peak_mb`` (the
step's peak memory above what the process held before it, largest rank; CPU: peak resident
set, measured with glibc's mmap threshold lowered so freed buffers leave the resident set;
CUDA: ``max_memory_allocated``), and the predicted per-rank sizes of docs/scaling.md:
``gathered_mb`` (features of all ranks held on one rank) and ``logits_mb`` (fp32 score
matrices). ``local_vs_full_memory_ratio`` = peak of CLIP's full N*B x N*B loss / peak of the
default local loss (B x N*B) at the largest batch and world: higher = more memory saved.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info, print_json, time_interleaved
from finegrain.heads.pooling import TextConditionedPooling
from finegrain.losses.contrastive import clip_loss, siglip_loss
from finegrain.losses.flair import flair_multi_positive_loss, text_conditioned_sigmoid_loss
from finegrain.losses.region import region_description_loss

MB = 2**20
F32 = 4  # bytes per element: losses and logits run in float32
VARIANTS = ("clip_local", "clip_full", "siglip_ring", "siglip_gather", "flair_mps_ring",
            "flair_mps_gather", "flair_tcs_ring", "flair_tcs_gather", "grain_region")  # fmt: skip
PAIRWISE = ("flair_tcs_ring", "flair_tcs_gather", "grain_region")  # sized by --pair-batch-sizes


def _unit(*shape: int, gen: torch.Generator, device: str) -> torch.Tensor:
    x = F.normalize(torch.randn(*shape, generator=gen), dim=-1).to(device)
    return x.requires_grad_()


def build_step(name: str, b: int, a: argparse.Namespace, rank: int) -> Callable[[], None]:
    """One training step of variant ``name`` at local batch ``b``: forward + backward."""
    gen = torch.Generator().manual_seed(1000 * rank + b)
    dev, d, k = a.device, a.dim, a.captions
    scale = torch.tensor(10.0, device=dev, requires_grad=True)
    bias = torch.tensor(-10.0, device=dev, requires_grad=True)
    if name.startswith(("clip", "siglip")):
        img, txt = _unit(b, d, gen=gen, device=dev), _unit(b, d, gen=gen, device=dev)
        if name.startswith("clip"):
            fn = lambda: clip_loss(img, txt, scale, local_loss=name == "clip_local")  # noqa: E731
        else:
            fn = lambda: siglip_loss(img, txt, scale, bias, exchange=name.split("_")[1])  # noqa: E731
        leaves = [img, txt, scale, bias]
    elif name.startswith("flair_mps"):
        img, txt = _unit(b, d, gen=gen, device=dev), _unit(b, k, d, gen=gen, device=dev)
        ex = name.split("_")[2]
        fn = lambda: flair_multi_positive_loss(img, txt, scale, bias, exchange=ex)  # noqa: E731
        leaves = [img, txt, scale, bias]
    elif name.startswith("flair_tcs"):
        torch.manual_seed(0)  # identical pooling weights on every rank
        pool = TextConditionedPooling(d, heads=a.heads).to(dev)
        tok = _unit(b, a.tokens, d, gen=gen, device=dev)  # (B, T, D) patch tokens
        txt = _unit(b, k, d, gen=gen, device=dev)  # (B, K, D) sub-captions
        ex = name.split("_")[2]
        fn = lambda: text_conditioned_sigmoid_loss(pool, tok, txt, scale, bias, exchange=ex)  # noqa: E731
        leaves = [tok, txt, scale, bias, *pool.parameters()]
    elif name == "grain_region":
        s = b * a.regions  # description slots on this rank
        reg, desc = _unit(s, d, gen=gen, device=dev), _unit(s, d, gen=gen, device=dev)
        matched = (torch.rand(s, generator=gen) < 0.75).to(dev)
        valid = torch.ones(s, dtype=torch.bool, device=dev)
        toks = torch.randint(0, 50, (s, 16), generator=gen).to(dev)
        fn = lambda: region_description_loss(reg, desc, matched, valid, scale, toks, gather=True)  # noqa: E731
        leaves = [reg, desc, scale]
    else:
        raise ValueError(f"unknown variant '{name}'; valid choices: {', '.join(VARIANTS)}")

    def step() -> None:
        for t in leaves:
            t.grad = None
        fn().backward()

    return step


def predicted(name: str, b: int, world: int, a: argparse.Namespace) -> dict[str, float]:
    """Per-rank sizes from the formulas of docs/scaling.md (fp32, N = world, B = local batch)."""
    n, d, k = world, a.dim, a.captions
    if name == "clip_local":  # image + text of all ranks; B x NB in both directions
        return {"gathered_mb": 2 * n * b * d * F32 / MB, "logits_mb": 2 * b * n * b * F32 / MB}
    if name == "clip_full":
        return {"gathered_mb": 2 * n * b * d * F32 / MB, "logits_mb": 2 * (n * b) ** 2 * F32 / MB}
    if name.startswith("siglip"):  # texts only; the ring keeps every received block for backward
        return {"gathered_mb": n * b * d * F32 / MB, "logits_mb": b * n * b * F32 / MB}
    if name.startswith("flair_mps"):
        return {"gathered_mb": n * b * k * d * F32 / MB, "logits_mb": b * n * b * k * F32 / MB}
    if name.startswith("flair_tcs"):  # B x M pooled vectors, M = NB + K - 1 texts per image
        m = n * b + k - 1
        return {"gathered_mb": n * b * k * d * F32 / MB, "logits_mb": b * m * F32 / MB,
                "pooled_mb": b * m * d * F32 / MB}  # fmt: skip
    s = b * a.regions  # grain_region: slots; descriptions gathered, ~0.75 S matched rows
    return {
        "gathered_mb": n * s * (d * F32 + 16 * 8) / MB,
        "logits_mb": 0.75 * s * n * s * F32 / MB,
    }


# ---- one process --------------------------------------------------------------------
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _peak_of(step: Callable[[], None], device: str) -> float:
    """Peak memory (MB) of one ``step`` above what the process held just before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / MB
    base = _status_mb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    step()
    return _status_mb("VmHWM:") - base


def worker(a: argparse.Namespace) -> None:
    """Runs in each launched process: every (variant, batch) step, results to ``a.worker``."""
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    if a.device == "cuda":
        a.device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    if world > 1:
        backend = "nccl" if a.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=600))
    rows = []
    for name in a.variants:
        for b in a.pair_batch_sizes if name in PAIRWISE else a.batch_sizes:
            step = build_step(name, b, a, rank)
            step()  # warm-up: first-call allocations and gloo buffers
            if world > 1:
                dist.barrier()
            peak = _peak_of(step, a.device)
            if world > 1:
                dist.barrier()
            t = time_interleaved({name: step}, repeats=a.repeats, warmup=0, device=a.device)
            rows.append({"variant": name, "batch": b, "time_s": t[name]["median_s"],
                         "cpu_s": t[name]["cpu_s"], "peak_mb": peak})  # fmt: skip
    Path(a.worker).with_suffix(f".{rank}.json").write_text(json.dumps(rows))
    if world > 1:
        dist.destroy_process_group()


# ---- launcher -------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, a: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    """Run ``world`` worker processes; per row the slowest rank's time and largest peak."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows"
        env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
                   MALLOC_MMAP_THRESHOLD_="131072",  # freed buffers leave the RSS
                   FINEGRAIN_MALLOC="system",  # (not retained: peaks are measured)
                   PYTHONPATH=str(Path(__file__).resolve().parents[1]))  # fmt: skip
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", str(out)]
        procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r))) for r in range(world)]
        codes = [p.wait(timeout=a.timeout) for p in procs]
        if any(codes):
            raise RuntimeError(f"bench_scaling: world {world} workers exited with {codes}")
        per_rank = [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(world)]
    rows = []
    for parts in zip(*per_rank, strict=True):
        row = dict(parts[0], world=world)
        row["time_s"] = max(p["time_s"] for p in parts)
        row["cpu_s"] = max(p["cpu_s"] for p in parts)
        row["peak_mb"] = max(p["peak_mb"] for p in parts)
        row.update(predicted(row["variant"], row["batch"], world, a))
        rows.append({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Growth from the smallest to the largest world per (variant, batch), and the memory the
    local loss saves against CLIP's full loss at the largest batch and world."""
    worlds = sorted({r["world"] for r in rows})
    lo, hi = worlds[0], worlds[-1]
    key = {(r["variant"], r["batch"], r["world"]): r for r in rows}
    growth: dict[str, dict[str, Any]] = {}
    for (v, b, w), r in key.items():
        if w != hi or (v, b, lo) not in key or hi == lo:
            continue
        base = key[(v, b, lo)]
        growth.setdefault(v, {})[str(b)] = {
            f"time_x_{hi}v{lo}": round(r["time_s"] / max(base["time_s"], 1e-9), 3),
            f"peak_x_{hi}v{lo}": round(r["peak_mb"] / max(base["peak_mb"], 1e-3), 3),
        }
    out: dict[str, Any] = {"growth": growth}
    b = max((r["batch"] for r in rows if r["variant"] == "clip_local"), default=None)
    if b is not None and ("clip_full", b, hi) in key and ("clip_local", b, hi) in key:
        full, local = key[("clip_full", b, hi)], key[("clip_local", b, hi)]
        out["local_vs_full_memory_ratio"] = round(full["peak_mb"] / max(local["peak_mb"], 1e-3), 3)
        out["local_vs_full_time_ratio"] = round(full["time_s"] / max(local["time_s"], 1e-9), 3)
        out["at"] = {"batch": b, "world": hi}
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 3 repeats (CPU preset)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: gloo; cuda: NCCL, one GPU per process")  # fmt: skip
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--pair-batch-sizes", type=int, nargs="+", default=[32, 128],
                   help="per-process images for FLAIR's L_tcs and GRAIN's region loss")  # fmt: skip
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--dim", type=int, default=512, help="embedding dim D (ViT-B/16: 512)")
    p.add_argument("--captions", type=int, default=4, help="FLAIR sub-captions per image K")
    p.add_argument("--tokens", type=int, default=196, help="FLAIR patch tokens per image T")
    p.add_argument("--heads", type=int, default=8, help="FLAIR pooling heads")
    p.add_argument("--regions", type=int, default=8, help="GRAIN description slots per image")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per world size")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.batch_sizes, a.pair_batch_sizes, a.tokens, a.repeats = [64, 256, 1024], [16, 64], 49, 3
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    if a.worker:
        worker(a)
        return {}
    if a.device == "cuda" and torch.cuda.device_count() < max(a.worlds):
        raise SystemExit(f"--device cuda needs {max(a.worlds)} GPUs, found "
                         f"{torch.cuda.device_count()}; use --device cpu")  # fmt: skip
    rows = [row for w in a.worlds for row in launch(w, a, argv)]
    config = {k: v for k, v in vars(a).items() if k not in ("worker", "timeout")}
    return {"benchmark": "scaling", "machine": machine_info(a.device), "config": config,
            "summary": summarise(rows), "rows": rows}  # fmt: skip


if __name__ == "__main__":
    result = main()
    if result:
        print_json(result)
