"""GRAIN's Hungarian matching: its share of a GRAIN training step.

A GRAIN step (forward + backward + AdamW step on one pre-collated batch of the built-in
synthetic scenes; data cost excluded) runs the region-query decoder, the description encodings
(B x Q region texts through the text tower), Hungarian matching and the box / region losses.
Matching time is measured around ``hungarian_match`` (cost tensor, one host copy and the
per-image ``linear_sum_assignment``; on CUDA the device is synchronised first so queued forward
work is not charged to matching) and reported as ``matching_share_of_step`` (lower is better).
GRAIN's step against CLIP's on the same towers (issue target on GPU at ViT-B/16 batch 128:
<= 1.4x) is ``bench_methods.py``'s comparison and is not repeated here.

Prints one JSON object: step time and samples/s (``benchmarks._common.time_interleaved``),
matching seconds per step and share, peak memory (CUDA: max allocated during the timed steps;
CPU: this process's peak RSS, VmHWM).

    python benchmarks/bench_grain.py --quick                  # CPU: grain_smoke towers, batch 16
    python benchmarks/bench_grain.py --preset vitb16 --batch-size 128 --precision bf16  # GPU
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    build_for_step,
    parse_step_args,
    print_json,
    step_summary,
    sync,
    time_interleaved,
    train_step,
)


def method_config(preset: str) -> Any:
    from finegrain.recipes.grain import grain_smoke_method, grain_vitb16

    return grain_smoke_method() if preset == "smoke" else grain_vitb16().method


def make_batch(cfg: Any, batch_size: int, device: torch.device) -> dict:
    from finegrain.data.config import SyntheticConfig
    from finegrain.data.synthetic_sets import SyntheticScenes
    from finegrain.methods.grain import GRAINCollate
    from finegrain.registry import TEXT_TOWERS

    tok_tower = TEXT_TOWERS.get(cfg.text.name)(
        dataclasses.replace(cfg.text, depth=1)
    )  # tokenizer only
    ds = SyntheticScenes(
        SyntheticConfig(seed=0, num_samples=batch_size), image_size=cfg.image.image_size
    )
    collate = GRAINCollate(
        tok_tower.tokenizer, cfg.num_region_queries, "random", int(tok_tower.pad_id)
    )
    batch = collate([ds[i] for i in range(batch_size)])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_step_args(__doc__.split("\n\n")[0], argv, steps=5, warmup=2,
                           presets="smoke (grain_smoke towers) | vitb16 (grain_vitb16)")  # fmt: skip
    import finegrain.methods.grain as grain_mod

    method, batch, device = build_for_step(args, method_config, make_batch)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
    match_time = [0.0]
    original = grain_mod.hungarian_match

    def timed_match(*a: Any, **kw: Any) -> Any:
        sync(device)
        t0 = time.perf_counter()
        out = original(*a, **kw)
        match_time[0] += time.perf_counter() - t0
        return out

    grain_mod.hungarian_match = timed_match
    step = train_step(lambda: method(batch).loss, opt, device, args.precision)
    for _ in range(args.warmup):
        step()
    sync(device)
    match_time[0] = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time_interleaved({"grain": step}, repeats=args.steps, warmup=0, device=device)["grain"]
    match_s = match_time[0] / args.steps
    return {
        "benchmark": "grain_matching",
        "config": vars(args),
        "matching_s_per_step": match_s,
        "matching_share_of_step": match_s / t["mean_s"],  # both means over the timed steps
        **step_summary(t, args.batch_size, device),
    }


if __name__ == "__main__":
    print_json(main())
