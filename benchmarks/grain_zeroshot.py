"""Description-aware zero-shot on the novel-concept split after a short GRAIN run (CPU).

Trains ``grain_smoke``'s tiny model (AdamW, warmup + cosine) on fresh built-in synthetic scenes
(novel shapes appear in training text only through their descriptions) and evaluates, every
``--eval-every`` steps, zero-shot classification of the novel split (4 classes, chance 0.25)
three ways via ``finegrain.eval.run_tasks``: class names only, class descriptions
(GRAIN's test-time descriptions), and descriptions with region-aware fusion
(alpha * global + (1 - alpha) * best region). Prints one JSON object with the curves.

    python benchmarks/grain_zeroshot.py --steps 600 --eval-every 200   # ~10 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--fusion-alpha", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from finegrain.data.config import SyntheticConfig
    from finegrain.data.synthetic_sets import SyntheticScenes
    from finegrain.eval import run_tasks
    from finegrain.methods.base import build_method
    from finegrain.recipes.grain import grain_smoke_method, zeroshot_tasks

    torch.manual_seed(0)
    method = build_method(grain_smoke_method())
    scenes = SyntheticScenes(
        SyntheticConfig(seed=0, num_samples=args.steps * args.batch_size), image_size=64
    )
    collate = method.make_collate(True)
    opt = torch.optim.AdamW(method.param_groups(0.1), lr=args.lr, betas=(0.9, 0.98))
    tasks = zeroshot_tasks(args.eval_samples, args.fusion_alpha)
    curve, t0 = [], time.time()
    for step in range(args.steps):
        batch = collate([scenes[step * args.batch_size + i] for i in range(args.batch_size)])
        warm = min(1.0, (step + 1) / 10)
        lr = args.lr * warm * 0.5 * (1 + math.cos(math.pi * step / args.steps))  # warmup + cosine
        for g in opt.param_groups:
            g["lr"] = lr
        out = method(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        method.after_optimizer_step(step + 1, args.steps)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            res = run_tasks(method, tasks, progress=False)
            method.train()
            point = {"step": step + 1, "matched_iou": round(float(out.metrics["matched_iou"]), 4),
                     **{k: round(v, 4) for k, v in res.items() if k.endswith("acc1")}}  # fmt: skip
            curve.append(point)
            print(json.dumps(point), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "grain_novel_zeroshot", "config": vars(args), "curve": curve,
                      "chance": 0.25, "wall_s": round(time.time() - t0, 1)}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
