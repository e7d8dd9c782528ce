"""Cost of the reliability checks (issue 17) as a fraction of a smoke training run's wall time.

Runs a smoke recipe through ``Trainer`` (checkpoints every ``--checkpoint-every`` steps), then
times, on that run's real artefacts:

- ``verify_s``: ``verify_checkpoint`` (safetensors header/size + weights-only ``state.pt``
  load) of *every* checkpoint the run wrote (``--resume latest`` verifies one, or a few when it
  falls back: an upper bound);
- ``grad_check_s``: the per-step finite-gradient check (one fused norm), x steps;
- ``data_validation_s``: what ``finegrain data convert`` adds per sample (full image decode +
  schema validation of the record) for every sample the run consumed, plus the tar end check
  (``data inspect`` / the loader's truncation test) of the shards those samples came from,
  timed on one shard and scaled per sample.

Each check is timed with ``benchmarks._common.time_interleaved`` (best of its repeats). The
verdict compares their sum with the run's wall time: ``reliability_overhead_ratio`` = checks'
seconds / run seconds (lower is better; target: at most 0.05). Prints one JSON object.

    python benchmarks/bench_reliability.py --quick          # clip_smoke, 10 steps
    python benchmarks/bench_reliability.py --recipe clip_smoke --steps 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info, print_json, time_interleaved  # noqa: E402
from finegrain.checkpoint import list_checkpoints, verify_checkpoint
from finegrain.config import apply_overrides
from finegrain.data.schema import parse_record
from finegrain.data.shards import encode_image, inspect_shards, write_shards
from finegrain.data.sources import decode_image
from finegrain.data.synthetic import generate_scene, scene_record
from finegrain.recipes.base import get_recipe
from finegrain.train import guard
from finegrain.train.trainer import Trainer


def _timed(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds of one call (no warm-up: these checks run once per use)."""
    return time_interleaved({"fn": fn}, repeats=repeats, warmup=0)["fn"]["min_s"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="clip_smoke")
    p.add_argument("--quick", action="store_true", help="10 steps (CPU preset)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 10)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = apply_overrides(get_recipe(args.recipe), [
            f"train.steps={args.steps}", f"train.checkpoint_every={args.checkpoint_every}",
            "train.keep_last=0", "train.progress=false", f"train.device={args.device}",
            *args.set])  # fmt: skip
        tr = Trainer(cfg, output_dir=str(Path(tmp) / "run"))
        t0 = time.perf_counter()
        summary = tr.fit()
        wall = time.perf_counter() - t0
        ckpts = list_checkpoints(Path(tmp) / "run" / "ckpt")
        verify = sum(_timed(lambda c=c: verify_checkpoint(c)) for c in ckpts)
        grad_check = _timed(lambda: guard.grads_finite(tr.params)) * args.steps
        samples = args.steps * cfg.data.batch_size * cfg.train.accum_steps
        n = min(samples, 256)  # time a sample of them, scale to all
        rows = []
        for i in range(n):
            scene = generate_scene(i, cfg.data.image_size)
            rows.append((encode_image(scene["image"]), scene_record(scene)))

        def validate() -> None:
            for data, record in rows:
                decode_image(data)
                parse_record(record, "k")

        data_validation = _timed(validate, 1) * samples / n
        shard = write_shards(({"key": f"{i:05d}", "image": d, "ext": "jpg", "json": r}
                              for i, (d, r) in enumerate(rows)), Path(tmp) / "s")  # fmt: skip
        # the check of one n-sample shard, scaled per sample to every sample consumed (an upper
        # bound: a shard's fixed cost is counted once per n samples, not once per 1000)
        tar_check = _timed(lambda: inspect_shards(shard[0]), 1) * samples / n
        data_validation += tar_check
    total = verify + grad_check + data_validation
    return {
        "benchmark": "reliability", "recipe": args.recipe, "steps": args.steps,
        "batch_size": cfg.data.batch_size, "status": summary["status"],
        "run_wall_s": round(wall, 3), "checkpoints": len(ckpts),
        "verify_s": round(verify, 4), "grad_check_s": round(grad_check, 4),
        "data_validation_s": round(data_validation, 4), "samples": samples,
        "reliability_overhead_ratio": total / wall, "overhead_target": 0.05,
        "ok": total / wall <= 0.05, "machine": machine_info(args.device),
    }  # fmt: skip


if __name__ == "__main__":
    print_json(main())
