"""CLIPpy's token sub-sampling at 2x resolution (Ranasinghe et al., ICCV 2023, Sec. 3.4):
training step time and peak memory of CLIPpy at 1x, at 2x with all tokens and at 2x keeping a
fraction of the patch tokens.

Variants (one model, timed round-robin with ``benchmarks._common.time_interleaved``):
- ``clippy_1x``: CLIPpy (max pooling over projected patch tokens) at the base resolution;
- ``clippy_2x``: CLIPpy at 2x resolution, all (4x as many) tokens;
- ``clippy_2x_keep``: CLIPpy at 2x resolution keeping ``--keep`` (0.2) of the patch tokens,
  the keep sets drawn per sample as in training (``finegrain.methods.clippy.sample_keep``).
The paper's point: ``clippy_2x_keep`` costs less than ``clippy_1x`` (0.2 x 4 = 0.8 of the 1x
tokens); ``checks`` reports it. CLIPpy's step against CLIP's on the same towers is
``bench_methods.py``'s comparison and is not repeated here.

Ratios (reference: ``clippy_1x``; step time and memory, so lower is better):
``clippy_2x_step_time_ratio``, ``clippy_2x_keep_step_time_ratio`` and their ``_peak_mem_ratio``
twins. Peak memory: CUDA, what a step allocates on top of model and optimizer state; CPU, the
peak RSS (VmHWM) of a fresh process that builds the model and runs one step of the variant.

    python benchmarks/bench_clippy.py --quick                   # CPU, about a minute
    python benchmarks/bench_clippy.py --preset vitb16 --device cuda
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    add_variant_args,
    machine_info,
    print_json,
    run_in_subprocess,
    time_steps,
    train_step,
    vm_hwm_mb,
)

VARIANTS = ("clippy_1x", "clippy_2x", "clippy_2x_keep")
PRESETS = {
    "small": dict(batch=16, image_size=64, patch=8, width=192, depth=4, heads=3, text_width=64,
                  text_depth=2, text_heads=2, context=32, embed=64),
    "vitb16": dict(batch=128, image_size=224, patch=16, width=768, depth=12, heads=12,
                   text_width=512, text_depth=12, text_heads=8, context=77, embed=512),
}  # fmt: skip


def _build(a: dict[str, Any]) -> Any:
    import finegrain.encoders  # noqa: F401  (registers the towers)
    from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
    from finegrain.methods.base import build_method
    from finegrain.recipes.base import method_config

    torch.manual_seed(0)
    image = ImageTowerConfig(name="vit", image_size=a["image_size"], patch_size=a["patch"],
                             width=a["width"], depth=a["depth"], heads=a["heads"])  # fmt: skip
    text = TextTowerConfig(name="transformer", context_length=a["context"], pooling="mean",
                           width=a["text_width"], depth=a["text_depth"], heads=a["text_heads"])  # fmt: skip
    return build_method(method_config("clippy", embed_dim=a["embed"], image=image, text=text))


def _batch(a: dict[str, Any], variant: str, dev: torch.device) -> dict[str, torch.Tensor]:
    from finegrain.methods.clippy import num_kept, sample_keep

    b, s = a["batch"], a["image_size"] * (2 if "2x" in variant else 1)
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, 1000, (b, a["context"]), generator=g)
    text[:, -1] = 49407  # an EOT token in every row
    batch = {"image": torch.randn(b, 3, s, s, generator=g), "text": text}
    if variant.endswith("_keep"):
        n = (s // a["patch"]) ** 2
        m = num_kept(n, a["keep"])
        batch["keep"] = torch.tensor([sample_keep(i, n, m) for i in range(b)])  # (B, M)
    return {k: v.to(dev) for k, v in batch.items()}


def _steps(a: dict[str, Any], variants: list[str]) -> dict[str, Any]:
    """{variant: step closure} on one model and optimizer."""
    torch.set_num_threads(a["threads"])
    dev = torch.device(a["device"])
    model = _build(a).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def one(batch: dict[str, torch.Tensor]) -> Any:
        return train_step(lambda: model(batch).loss, opt, dev, a["precision"])

    return {v: one(_batch(a, v, dev)) for v in variants}


def _rss_after_step(a: dict[str, Any], variant: str) -> float:
    """Peak RSS (MB) of this (fresh) process after building the model and one step."""
    _steps(a, [variant])[variant]()
    return vm_hwm_mb()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_variant_args(p, sorted(PRESETS), "small")
    p.add_argument("--keep", type=float, default=0.2, help="kept fraction at 2x (paper: 0.2)")
    p.add_argument("--batch", type=int, default=None)
    ns = p.parse_args(argv)
    from finegrain.methods.clippy import check_keep_fraction

    if ns.quick:
        ns.preset, ns.repeats = "small", min(ns.repeats, 2)
    dev = torch.device(ns.device)
    a = dict(PRESETS[ns.preset])
    a.update(device=ns.device, precision=ns.precision if dev.type == "cuda" else "fp32",
             threads=ns.threads, keep=check_keep_fraction(ns.keep, "--keep"))  # fmt: skip
    if ns.batch:
        a["batch"] = ns.batch
    rss = None if ns.no_memory else functools.partial(run_in_subprocess, _rss_after_step, a)
    s = time_steps(_steps(a, list(VARIANTS)), a["batch"], ns.repeats, dev, rss)
    mem = "step_peak_mem_mb" if dev.type == "cuda" else "process_peak_rss_mb"
    ratios = {}
    for v in ("clippy_2x", "clippy_2x_keep"):
        ratios[f"{v}_step_time_ratio"] = s[v]["step_s"] / s["clippy_1x"]["step_s"]
        ratios[f"{v}_cpu_time_ratio"] = s[v]["cpu_s"] / max(s["clippy_1x"]["cpu_s"], 1e-9)
        if mem in s[v]:
            ratios[f"{v}_peak_mem_ratio"] = s[v][mem] / max(s["clippy_1x"][mem], 1e-9)
    checks = {"subsampled_2x_cheaper_than_full_1x": ratios["clippy_2x_keep_step_time_ratio"] < 1}
    return {"benchmark": "clippy", "config": a, "steps": s, "ratios": ratios, "checks": checks,
            "machine": machine_info(dev)}  # fmt: skip


if __name__ == "__main__":
    print_json(main())
