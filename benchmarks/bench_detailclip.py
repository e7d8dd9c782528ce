"""DetailCLIP's training step broken down by component: each component's share of the step.

A DetailCLIP step (forward + backward + AdamW step on one synthetic batch: random pixels and
tokens; data cost excluded) runs the EMA teacher forward on both full views with CLS attention,
the iBOT head on the teacher's tokens, the student on the kept tokens of both views, the MAE
decoder, the pixel and iBOT heads, and the EMA update. Component times are forward times
measured with hooks in a separate pass (device synchronised around each component, so that
pass is slower than the timed one), as shares of the step (``component_share_of_step``; the
EMA update and iBOT centre update, ``ema_and_centres``, timed around ``after_optimizer_step``).
DetailCLIP's step against CLIP's on the same towers is ``bench_methods.py``'s comparison and
is not repeated here.

Prints one JSON object: step time and samples/s (``benchmarks._common.time_interleaved``),
peak memory (CUDA: max allocated during the timed steps; CPU: this process's peak RSS, VmHWM),
component shares.

    python benchmarks/bench_detailclip.py --quick            # CPU: detailclip_smoke, batch 16
    python benchmarks/bench_detailclip.py --device cuda --preset vitb16 --batch-size 256 --precision bf16
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
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
    from finegrain.recipes.detailclip import detailclip_vitb16, smoke_config

    return smoke_config("detailclip").method if preset == "smoke" else detailclip_vitb16().method


def make_batch(cfg: Any, b: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    s, L = cfg.image.image_size, cfg.text.context_length
    text = torch.randint(1, 1000, (b, L), generator=g)
    text[:, L // 2] = 49407  # EOT (highest id) mid-sequence
    views = torch.randn(b, 2, 3, s, s, generator=g)
    return {"views": views.to(device), "image": views[:, 0].contiguous().to(device),
            "text": text.to(device)}  # fmt: skip


def _component_hooks(method: Any, device: torch.device, times: dict) -> list:
    parts = {"teacher_forward": [method.teacher["image"], method.teacher["ibot_head"]],
             "decoder": [method.decoder], "heads": [method.ibot_head, method.pixel_head]}  # fmt: skip
    handles = []
    for name, mods in parts.items():
        for m in mods:

            def pre(mod: Any, inp: Any) -> None:
                sync(device)
                mod._t0 = time.perf_counter()

            def post(mod: Any, inp: Any, out: Any, _n: str = name) -> None:
                sync(device)
                times[_n] += time.perf_counter() - mod._t0

            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_step_args(__doc__.split("\n\n")[0], argv, steps=3, warmup=1,
                           presets="smoke (detailclip_smoke) | vitb16 (detailclip_vitb16)")  # fmt: skip
    method, batch, device = build_for_step(args, method_config, make_batch)
    opt = torch.optim.AdamW([p for g in method.param_groups(0.1) for p in g["params"]], lr=1e-4)
    optimize = train_step(lambda: method(batch).loss, opt, device, args.precision)
    times: dict[str, float] = defaultdict(float)
    n = [0]

    def step() -> None:
        optimize()
        n[0] += 1
        sync(device)
        t0 = time.perf_counter()
        method.after_optimizer_step(n[0], 1000)
        sync(device)
        times["ema_and_centres"] += time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    times.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time_interleaved({"detailclip": step}, args.steps, warmup=0, device=device)["detailclip"]
    ema = times["ema_and_centres"] / args.steps
    times.clear()
    handles = _component_hooks(method, device, times)
    for _ in range(args.steps):
        step()
    for h in handles:
        h.remove()
    shares = {k: v / args.steps / t["mean_s"] for k, v in times.items() if k != "ema_and_centres"}
    return {
        "benchmark": "detailclip_components",
        "config": vars(args),
        "component_share_of_step": {**shares, "ema_and_centres": ema / t["mean_s"]},
        **step_summary(t, args.batch_size, device),
    }


if __name__ == "__main__":
    print_json(main())
