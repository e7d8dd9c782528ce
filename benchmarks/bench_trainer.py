"""Trainer overhead: steps/s of a recipe through ``Trainer`` vs a bare loop on the same model.

Both consume the same pre-collated batches (data loading excluded) and run interleaved, so
machine noise hits both alike; the bare loop is ``zero_grad; method(batch).loss.backward();
AdamW.step()``. With ``--set train.accum_steps=K`` the bare loop accumulates K micro-batch
losses naively, so the ratio is the price of *exact* contrastive accumulation (each
micro-batch's features are computed twice). Prints one JSON object. CPU default is tiny; on a GPU pass e.g.
``--recipe clip_vitb16 --set data.batch_size=64 --device cuda``.

    python benchmarks/bench_trainer.py --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from itertools import cycle

import torch

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(method, batches, steps, cfg, device) -> float:
    opt = build_optimizer(method, cfg.train)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    it = cycle(batches)
    _sync(device)
    t0 = time.perf_counter()
    k = cfg.train.accum_steps  # k > 1: naive accumulation (per-micro-batch loss, inexact)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for _ in range(k):
            batch = to_device(next(it), device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = method(batch).loss / k
            loss.backward()
        opt.step()
    _sync(device)
    return steps / (time.perf_counter() - t0)


def trainer_loop(trainer: Trainer, steps: int, out_dir: str) -> float:
    log = RunLogger(out_dir, total_steps=10**9, log_every=trainer.t.log_every, progress=False)
    it = iter(trainer.loader)
    _sync(trainer.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer._one_step(it, log)
    _sync(trainer.device)
    rate = steps / (time.perf_counter() - t0)
    log.close()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="clip_smoke")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-batches", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="key.sub=value")
    args = p.parse_args()
    cfg = apply_overrides(get_recipe(args.recipe), [
        *args.set, f"train.device={args.device}", "train.progress=false", "eval.tasks=[]",
        "train.checkpoint_every=0", "train.log_every=10", f"train.steps={10**6}"])  # fmt: skip
    torch.manual_seed(cfg.seed)
    method = build_method(cfg.method)
    from finegrain.data import build_train_loader

    source = iter(build_train_loader(cfg.data, method.make_collate(True), seed=cfg.seed,
                                     transform=method.make_transform(cfg.data, train=True)))  # fmt: skip
    batches = [next(source) for _ in range(args.num_batches)]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, loader=ListLoader(batches), output_dir=tmp)
        device = trainer.device
        bare_method = trainer.method  # the same model object: identical compute
        bare_loop(bare_method, batches, 2, cfg, device)  # warm-up both paths
        trainer_loop(trainer, 2, tmp)
        bare, ours = [], []
        for _ in range(args.repeats):
            bare.append(bare_loop(bare_method, batches, args.steps, cfg, device))
            ours.append(trainer_loop(trainer, args.steps, tmp))
    b, o = statistics.median(bare), statistics.median(ours)
    out = {
        "recipe": args.recipe, "device": str(device), "precision": cfg.train.precision,
        "batch_size": cfg.data.batch_size, "accum_steps": cfg.train.accum_steps, "steps": args.steps, "repeats": args.repeats,
        "bare_steps_per_s": round(b, 3), "trainer_steps_per_s": round(o, 3),
        "trainer_over_bare": round(o / b, 4), "overhead_pct": round(100 * (b / o - 1), 2),
        "bare_runs": [round(x, 3) for x in bare], "trainer_runs": [round(x, 3) for x in ours],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }  # fmt: skip
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
