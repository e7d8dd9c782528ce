"""Forward+backward speed and peak memory: finegrain's native CLIP towers vs open_clip's own
model of the same architecture (same widths/depths/heads, random init, same loss).

    python benchmarks/bench_towers.py --quick               # CPU: ViT-S-32, batch 4, 1 step
    python benchmarks/bench_towers.py --device cpu          # ViT-B-16, batch 8, fp32
    python benchmarks/bench_towers.py --device cuda --batch 256 --precision bf16

Each model runs in a fresh subprocess (``benchmarks._common.run_in_subprocess``) so CPU peak
memory is not shared between them; ``--rounds`` alternates the two and keeps each one's
fastest. Steps are timed with ``time_interleaved`` (warm-up, median of wall and CPU seconds).
Memory: CUDA ``max_memory_allocated`` over warm-up + timed steps minus what was allocated
before them (model + inputs); CPU the process peak RSS (VmHWM) minus the RSS just before the
first step, i.e. activations + gradients (an estimate: the allocator may keep freed pages, and
RSS counts pages, not tensors). Ratios: ``step_speed_ratio`` = ours / open_clip samples/s,
``cpu_time_speed_ratio`` = open_clip / ours CPU seconds per step (meaningful on a shared
machine), both higher is better; ``peak_mem_ratio`` = ours / open_clip memory, lower is better.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    autocast,
    machine_info,
    print_json,
    run_in_subprocess,
    time_interleaved,
    vm_hwm_mb,
)


def _ours(arch: str) -> torch.nn.Module:
    """finegrain CLIP with towers sized like open_clip's ``arch`` config."""
    import open_clip

    from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
    from finegrain.methods.clip import CLIP, CLIPConfig

    mc = open_clip.get_model_config(arch)
    v, t = mc["vision_cfg"], mc["text_cfg"]
    vw = v["width"]
    image = ImageTowerConfig(name="vit", image_size=v["image_size"], patch_size=v["patch_size"],
                             width=vw, depth=v["layers"], heads=vw // v.get("head_width", 64),
                             mlp_ratio=v.get("mlp_ratio", 4.0))  # fmt: skip
    text = TextTowerConfig(name="transformer", context_length=t["context_length"],
                           vocab_size=t["vocab_size"], width=t["width"], depth=t["layers"],
                           heads=t["heads"], mlp_ratio=t.get("mlp_ratio", 4.0))  # fmt: skip
    return CLIP(CLIPConfig(image=image, text=text, embed_dim=mc["embed_dim"]))


def _loss_fn(
    kind: str, model: torch.nn.Module, images: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    from finegrain.losses.contrastive import clip_loss

    if kind == "ours":
        return model({"image": images, "text": ids}).loss
    img, txt, scale = model(images, ids)  # open_clip: normalised features and exp'd scale
    return clip_loss(img, txt, scale)


def _rss_mb() -> float:
    """This process's current resident memory in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _run(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    if args["threads"] > 0:
        torch.set_num_threads(args["threads"])
    dev = torch.device(args["device"])
    if kind == "ours":
        model = _ours(args["arch"])
    else:
        import open_clip

        model = open_clip.create_model(args["arch"])
    model.to(dev).train()
    size = _image_size(args["arch"])
    images = torch.randn(args["batch"], 3, size, size, device=dev)
    n = args["text_len"]  # tokens per caption incl. SOT/EOT, padded with 0 to 77
    ids = torch.zeros(args["batch"], 77, dtype=torch.long, device=dev)
    ids[:, :n] = torch.randint(1, 49000, (args["batch"], n), device=dev)
    ids[:, n - 1] = 49407  # EOT

    def step() -> None:  # forward + backward, no optimizer (the towers are what is compared)
        model.zero_grad(set_to_none=True)
        with autocast(dev, args["precision"]):
            loss = _loss_fn(kind, model, images, ids)
        loss.backward()

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()  # VmHWM cannot be reset: measure from before the first step
    t = time_interleaved({kind: step}, args["steps"], args["warmup"], dev)[kind]
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
        how = "cuda max_memory_allocated minus allocated before the first step"
    else:
        peak = vm_hwm_mb() - base
        how = "cpu VmHWM minus RSS before the first step"
    params = sum(p.numel() for p in model.parameters())
    return {"kind": kind, "samples_per_s": args["batch"] / t["median_s"], "step_s": t["median_s"],
            "cpu_s_per_step": t["cpu_s"], "peak_memory_mb": max(peak, 0.0),
            "memory_measure": how, "params_m": params / 1e6}  # fmt: skip


def _image_size(arch: str) -> int:
    import open_clip

    return int(open_clip.get_model_config(arch)["vision_cfg"]["image_size"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--arch", default="ViT-B-16", help="open_clip architecture name (ViT-B-16, ViT-S-32)"
    )
    p.add_argument("--quick", action="store_true", help="ViT-S-32, batch 4, 1 step (CPU preset)")
    p.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 256 on CUDA")
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision", default=None, choices=["fp32", "bf16"], help="default: fp32 CPU, bf16 CUDA"
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="alternate runs; the fastest of each is kept"
    )
    p.add_argument("--text-len", type=int, default=77,
                   help="caption length in tokens (77: no padding; real captions are ~15-25)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    a = p.parse_args(argv)
    if a.quick:
        a.arch, a.batch, a.steps = "ViT-S-32", a.batch or 4, 1
    cuda = a.device.startswith("cuda")
    args = {"arch": a.arch, "batch": a.batch or (256 if cuda else 8), "steps": a.steps,
            "warmup": max(1, a.warmup), "device": a.device, "threads": a.threads,
            "rounds": a.rounds, "text_len": max(2, min(77, a.text_len)),
            "precision": a.precision or ("bf16" if cuda else "fp32")}  # fmt: skip
    results: dict[str, dict] = {}
    for _ in range(a.rounds):  # alternate the two so machine load hits both alike
        for kind in ("ours", "open_clip"):
            res = run_in_subprocess(_run, kind, args)
            best = results.get(kind)
            if best is None or res["samples_per_s"] > best["samples_per_s"]:
                results[kind] = res
    ours, ref = results["ours"], results["open_clip"]
    return {
        "benchmark": "clip_towers_forward_backward", **args, "ours": ours, "open_clip": ref,
        "step_speed_ratio": ours["samples_per_s"] / ref["samples_per_s"],
        # CPU seconds consumed per step (all threads): robust when other jobs share the cores
        "cpu_time_speed_ratio": ref["cpu_s_per_step"] / ours["cpu_s_per_step"],
        "peak_mem_ratio": ours["peak_memory_mb"] / max(ref["peak_memory_mb"], 1e-9),
        "machine": machine_info(a.device),
    }  # fmt: skip


if __name__ == "__main__":
    print_json(main())
