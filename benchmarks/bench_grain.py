"""GRAIN training step vs CLIP training step on the same towers and batch.

Both variants run forward + backward + AdamW step on one pre-collated batch of the built-in
synthetic scenes (data cost excluded). GRAIN adds the region-query decoder, the description
encodings (B x Q region texts through the text tower), Hungarian matching and the box /
region losses; CLIP (``finegrain.methods.clip``) is the dual encoder with the same towers and
``embed_dim``. Matching time is measured around ``hungarian_match`` (cost tensor, one host
copy and the per-image ``linear_sum_assignment``; on CUDA the device is synchronised first so
queued forward work is not charged to matching) and reported as a share of the GRAIN step.

Prints one JSON object: samples/s per variant, step-time ratio GRAIN / CLIP (issue target on
GPU at ViT-B/16 batch 128: <= 1.4), peak memory (CUDA: max allocated; CPU: growth of the
process's max RSS, each variant in a fresh subprocess), and the matching share.

    python benchmarks/bench_grain.py                      # CPU: grain_smoke towers, batch 16
    python benchmarks/bench_grain.py --preset vitb16 --batch-size 128 --precision bf16  # GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import resource
import sys
import time

import torch


def method_configs(preset: str):
    from finegrain.methods.clip import CLIPConfig
    from finegrain.recipes.grain import grain_smoke_method, grain_vitb16

    if preset not in ("smoke", "vitb16"):
        raise ValueError(f"unknown preset '{preset}'; valid choices: smoke, vitb16")
    g = grain_smoke_method() if preset == "smoke" else grain_vitb16().method
    return g, CLIPConfig(image=g.image, text=g.text, embed_dim=g.embed_dim)


def make_batch(cfg, batch_size: int, device: torch.device) -> dict:
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


def run_variant(variant: str, args: argparse.Namespace, queue: mp.Queue | None = None) -> dict:
    import finegrain.methods.grain as grain_mod
    from finegrain.methods.base import build_method

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    gcfg, ccfg = method_configs(args.preset)
    batch = make_batch(gcfg, args.batch_size, device)
    method = build_method(gcfg if variant == "grain" else ccfg).to(device).train()
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
    match_time = [0.0]
    original = grain_mod.hungarian_match

    def timed_match(*a, **kw):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = original(*a, **kw)
        match_time[0] += time.perf_counter() - t0
        return out

    grain_mod.hungarian_match = timed_match
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = method(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    match_time[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    )
    res = {"step_s": dt, "samples_per_s": args.batch_size / dt, "peak_mem_mib": peak,
           "matching_s_per_step": match_time[0] / args.steps}  # fmt: skip
    if queue is not None:
        queue.put(res)
    return res


def in_subprocess(variant: str, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=run_variant, args=(variant, args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset", default="smoke", help="smoke (grain_smoke towers) | vitb16 (grain_vitb16)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runner = in_subprocess if args.device == "cpu" else run_variant
    clip = runner("clip", args)
    grain = runner("grain", args)
    out = {
        "benchmark": "grain_step_vs_clip_step",
        "config": vars(args),
        "clip": clip,
        "grain": grain,
        "step_time_ratio_grain_over_clip": grain["step_s"] / clip["step_s"],
        "peak_mem_ratio_grain_over_clip": grain["peak_mem_mib"] / max(clip["peak_mem_mib"], 1e-9),
        "matching_share_of_grain_step": grain["matching_s_per_step"] / grain["step_s"],
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
