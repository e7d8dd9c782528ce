"""DetailCLIP training step vs CLIP training step on the same towers and batch size.

Both run forward + backward + AdamW step on one synthetic batch (random pixels and tokens; data
cost excluded). DetailCLIP adds: the EMA teacher forward on both full views with CLS attention,
the iBOT head on the teacher's tokens, the student on the kept tokens of both views, the MAE
decoder, the pixel and iBOT heads, the EMA update; CLIP is the dual encoder on one view with the
same towers and ``embed_dim``. Component times are forward times measured with hooks in a
separate timed pass (device synchronised around each component), as shares of the DetailCLIP step.

Prints one JSON object: samples/s per variant, step-time ratio DetailCLIP / CLIP, peak memory
(CUDA: max allocated; CPU: growth of the process's max RSS, each variant in a fresh subprocess),
component shares (teacher forward, decoder, heads, EMA update).

    python benchmarks/bench_detailclip.py                     # CPU: detailclip_smoke, batch 16
    python benchmarks/bench_detailclip.py --device cuda --preset vitb16 --batch-size 256 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from collections import defaultdict

import torch


def method_configs(preset: str):
    from finegrain.methods.clip import CLIPConfig
    from finegrain.recipes.detailclip import detailclip_vitb16, smoke_config

    if preset not in ("smoke", "vitb16"):
        raise ValueError(f"unknown preset '{preset}'; valid choices: smoke, vitb16")
    d = smoke_config("detailclip").method if preset == "smoke" else detailclip_vitb16().method
    return d, CLIPConfig(image=d.image, text=d.text, embed_dim=d.embed_dim)


def make_batch(cfg, b: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    s, L = cfg.image.image_size, cfg.text.context_length
    text = torch.randint(1, 1000, (b, L), generator=g)
    text[:, L // 2] = 49407  # EOT (highest id) mid-sequence
    views = torch.randn(b, 2, 3, s, s, generator=g)
    return {"views": views.to(device), "image": views[:, 0].contiguous().to(device),
            "text": text.to(device)}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _component_hooks(method, device: torch.device, times: dict) -> list:
    parts = {"teacher_forward": [method.teacher["image"], method.teacher["ibot_head"]],
             "decoder": [method.decoder], "heads": [method.ibot_head, method.pixel_head]}  # fmt: skip
    handles = []
    for name, mods in parts.items():
        for m in mods:

            def pre(mod, inp, _n=name):
                _sync(device)
                mod._t0 = time.perf_counter()

            def post(mod, inp, out, _n=name):
                _sync(device)
                times[_n] += time.perf_counter() - mod._t0

            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


def run_variant(variant: str, args: argparse.Namespace, queue=None) -> dict:
    from finegrain.methods.base import build_method

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dcfg, ccfg = method_configs(args.preset)
    batch = make_batch(dcfg, args.batch_size, device)
    method = build_method(dcfg if variant == "detailclip" else ccfg).to(device).train()
    opt = torch.optim.AdamW([p for g in method.param_groups(0.1) for p in g["params"]], lr=1e-4)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: dict = defaultdict(float)
    n = [0]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = method(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        n[0] += 1
        _sync(device)
        t0 = time.perf_counter()
        method.after_optimizer_step(n[0], 1000)
        _sync(device)
        times["ema_and_centres"] += time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    _sync(device)
    times.clear()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    res = {"step_s": dt, "samples_per_s": args.batch_size / dt}
    res["peak_mem_mib"] = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                           else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)  # fmt: skip
    if variant == "detailclip":
        ema = times["ema_and_centres"] / args.steps
        times.clear()
        handles = _component_hooks(method, device, times)
        for _ in range(args.steps):
            step()
        for h in handles:
            h.remove()
        shares = {k: v / args.steps / dt for k, v in times.items() if k != "ema_and_centres"}
        res["component_share_of_step"] = {**shares, "ema_and_centres": ema / dt}
    if queue is not None:
        queue.put(res)
    return res


def in_subprocess(variant: str, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=run_variant, args=(variant, args, q))
    p.start()
    while True:  # a crashed child must not leave the parent waiting forever
        try:
            res = q.get(timeout=5)
            break
        except Exception:
            if not p.is_alive():
                raise RuntimeError(
                    f"{variant} benchmark process died (exit {p.exitcode})"
                ) from None
    p.join()
    return res


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smoke", help="smoke (detailclip_smoke) | vitb16")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    runner = in_subprocess if args.device == "cpu" else run_variant
    clip = runner("clip", args)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    detail = runner("detailclip", args)
    out = {
        "benchmark": "detailclip_step_vs_clip_step",
        "config": vars(args),
        "clip": clip,
        "detailclip": detail,
        "step_time_ratio_detailclip_over_clip": detail["step_s"] / clip["step_s"],
        "peak_mem_ratio_detailclip_over_clip": detail["peak_mem_mib"]
        / max(clip["peak_mem_mib"], 1e-9),
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
