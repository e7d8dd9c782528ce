"""Trainer overhead: steps/s of a recipe through ``Trainer`` vs a bare loop on the same model.

Both consume the same pre-collated batches (data loading excluded) and run round-robin
(``benchmarks._common.time_interleaved``: one call = ``--steps`` steps), so machine noise hits
both alike; the bare loop is ``zero_grad; method(batch).loss.backward(); AdamW.step()``. With
``--set train.accum_steps=K`` the bare loop accumulates K micro-batch losses naively, so the
ratio is the price of *exact* contrastive accumulation (each micro-batch's features are computed
twice). ``trainer_speed_ratio`` = trainer / bare steps/s (higher is better; 1 = no overhead).
Prints one JSON object. CPU default is tiny; on a GPU pass e.g.
``--recipe clip_vitb16 --set data.batch_size=64``.

    python benchmarks/bench_trainer.py --quick              # clip_smoke, 5 steps x 2 repeats
    python benchmarks/bench_trainer.py --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from itertools import cycle
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    machine_info,
    peak_memory_mb,
    print_json,
    time_interleaved,
)
from finegrain.config import apply_overrides
from finegrain.methods.base import build_method
from finegrain.recipes.base import get_recipe
from finegrain.train.logging import RunLogger
from finegrain.train.optim import build_optimizer
from finegrain.train.step import to_device
from finegrain.train.trainer import Trainer


class ListLoader:
    """Cycles over fixed batches; has the TrainLoader interface the trainer uses."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __iter__(self):
        return cycle(self.batches)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def stats(self) -> dict:
        return {"seen": 0, "broken": 0}


def bare_loop(method: Any, batches: list[dict], steps: int, cfg: Any, device: Any) -> Any:
    """A closure running ``steps`` bare optimizer steps (optimizer built once)."""
    opt = build_optimizer(method, cfg.train)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    it = cycle(batches)
    k = cfg.train.accum_steps  # k > 1: naive accumulation (per-micro-batch loss, inexact)

    def run() -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            for _ in range(k):
                batch = to_device(next(it), device)
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    loss = method(batch).loss / k
                loss.backward()
            opt.step()

    return run


def trainer_loop(trainer: Trainer, steps: int, out_dir: str) -> tuple[Any, RunLogger]:
    """A closure running ``steps`` steps through the trainer's own step."""
    log = RunLogger(out_dir, total_steps=10**9, log_every=trainer.t.log_every, progress=False)
    it = iter(trainer.loader)

    def run() -> None:
        for _ in range(steps):
            trainer._one_step(it, log)

    return run, log


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="clip_smoke")
    p.add_argument("--quick", action="store_true", help="5 steps x 2 repeats (CPU preset)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-batches", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="key.sub=value")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = min(args.steps, 5), min(args.repeats, 2)
    cfg = apply_overrides(get_recipe(args.recipe), [
        *args.set, f"train.device={args.device}", "train.progress=false", "eval.tasks=[]",
        "train.checkpoint_every=0", "train.log_every=10", f"train.steps={10**6}"])  # fmt: skip
    torch.manual_seed(cfg.seed)
    method = build_method(cfg.method)
    from finegrain.data import method_loader

    source = iter(method_loader(method, cfg.data, seed=cfg.seed))
    batches = [next(source) for _ in range(args.num_batches)]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, loader=ListLoader(batches), output_dir=tmp)
        device = trainer.device
        # the same model object: identical compute; warm-up is one call (= --steps steps) each
        ours, log = trainer_loop(trainer, args.steps, tmp)
        fns = {"bare": bare_loop(trainer.method, batches, args.steps, cfg, device), "trainer": ours}
        t = time_interleaved(fns, repeats=args.repeats, warmup=1, device=device)
        log.close()
    b, o = args.steps / t["bare"]["median_s"], args.steps / t["trainer"]["median_s"]
    return {
        "benchmark": "trainer_overhead",
        "recipe": args.recipe, "precision": cfg.train.precision,
        "batch_size": cfg.data.batch_size, "accum_steps": cfg.train.accum_steps,
        "steps": args.steps, "repeats": args.repeats,
        "bare_steps_per_s": b, "trainer_steps_per_s": o,
        "trainer_speed_ratio": o / b, "overhead_pct": 100 * (b / o - 1),
        "trainer_cpu_time_speed_ratio": t["bare"]["cpu_s"] / max(t["trainer"]["cpu_s"], 1e-9),
        "peak_mem_mb": peak_memory_mb(device),
        "machine": machine_info(device),
    }  # fmt: skip


if __name__ == "__main__":
    print_json(main())
