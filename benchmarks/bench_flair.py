"""FLAIR's batched text-conditioned sigmoid loss vs a straightforward per-image loop, and
the cost of FLAIR's text-conditioned branch within a training step.

Variants of one training step (one model, timed round-robin with
``benchmarks._common.time_interleaved``):
- ``mps``: the multi-positive sigmoid loss on all B x K sub-captions (FLAIR without the
  text-conditioned branch: the same text-tower workload as FLAIR);
- ``flair``: finegrain's FLAIR step (batched pooling of all B x (B + K - 1) pairs);
- ``flair_loop``: the same step with the text-conditioned loss computed image by image.
Plus ``tcs_loss``: forward + backward of the text-conditioned loss alone on random features,
batched vs per-image loop (no towers). FLAIR's step against CLIP's on the same towers is
``bench_methods.py``'s comparison and is not repeated here.

Ratios: ``batched_tcs_step_speed_ratio`` and ``batched_tcs_loss_speed_ratio`` are the loop's
seconds over the batched version's (speed, higher is better); ``batched_tcs_peak_mem_ratio`` is
``flair`` / ``flair_loop`` memory and ``tcs_branch_step_time_ratio`` is ``flair`` / ``mps`` step
time (the text-conditioned branch's overhead): lower is better for those two.

CPU defaults are tiny; ``--preset vitb16 --device cuda`` is the paper's ViT-B/16, batch 128,
K = 8 setup (bf16 autocast). Peak memory: CUDA, what a step allocates on top of model and
optimizer state; CPU, the peak RSS (VmHWM) of a fresh process that builds the model and runs
one step of the variant.

    python benchmarks/bench_flair.py --quick                # CPU, tiny, about a minute
    python benchmarks/bench_flair.py --preset vitb16 --device cuda
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    add_variant_args,
    machine_info,
    print_json,
    run_in_subprocess,
    time_interleaved,
    time_steps,
    train_step,
    vm_hwm_mb,
)

VARIANTS = ("mps", "flair", "flair_loop")
PRESETS = {
    "tiny": dict(batch=16, k=4, image_size=64, patch=8, width=64, depth=2, heads=2, text_width=64,
                 text_depth=2, text_heads=2, context=32, embed=64, pool_heads=4),
    "vitb16": dict(batch=128, k=8, image_size=224, patch=16, width=768, depth=12, heads=12,
                   text_width=512, text_depth=12, text_heads=8, context=77, embed=512, pool_heads=8),
}  # fmt: skip


def per_image_loop_tcs(pooling, tokens, texts, logit_scale, logit_bias, pair_seed) -> torch.Tensor:
    """The text-conditioned sigmoid loss (FLAIR L^tcs, released normalisation) written the
    straightforward way: for each image, gather its B + K - 1 texts and pool them."""
    from finegrain.losses.flair import pair_offsets

    b, k, _ = texts.shape
    off = pair_offsets(pair_seed, pair_seed, k)  # (B, B)
    total = texts.new_zeros((), dtype=torch.float32)
    for i in range(b):
        sel = [texts[i, c] for c in range(k)] + [
            texts[j, int(off[i, j])] for j in range(b) if j != i
        ]
        t = torch.stack(sel)  # (M, D)
        pooled = F.normalize(pooling(t.unsqueeze(0), tokens[i : i + 1])[0], dim=-1)  # (M, D)
        logits = (logit_scale * (pooled * F.normalize(t, dim=-1)).sum(-1) + logit_bias).float()
        signs = torch.full_like(logits, -1.0)
        signs[:k] = 1.0
        total = total - F.logsigmoid(signs * logits).sum()
    return total / (b + k - 1)


def _build(a: dict[str, Any]):
    import finegrain.encoders  # noqa: F401  (registers the towers)
    from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
    from finegrain.methods.flair import FLAIR, FLAIRConfig

    cfg = FLAIRConfig(
        embed_dim=a["embed"], num_subcaptions=a["k"], pool_heads=a["pool_heads"],
        image=ImageTowerConfig(name="vit", image_size=a["image_size"], patch_size=a["patch"],
                               width=a["width"], depth=a["depth"], heads=a["heads"]),
        text=TextTowerConfig(name="transformer", context_length=a["context"], width=a["text_width"],
                             depth=a["text_depth"], heads=a["text_heads"]),
    )  # fmt: skip
    return FLAIR(cfg)


def _loss(model, batch: dict[str, torch.Tensor], variant: str) -> torch.Tensor:
    from finegrain.losses.flair import flair_multi_positive_loss

    if variant == "flair":
        return model(batch).loss
    scale, bias = model.logit_scale.exp(), model.logit_bias
    f = model.features(batch)
    mps = flair_multi_positive_loss(
        F.normalize(f["image"], dim=-1), F.normalize(f["texts"], dim=-1), scale, bias
    )
    if variant == "mps":
        return mps
    # flair_loop: the same step, loop-based text-conditioned loss
    tcs = per_image_loop_tcs(
        model.pooling, f["image_tokens"], f["texts"], scale, bias, f["pair_seed"]
    )
    return (tcs + mps) / 2


def _steps(a: dict[str, Any], variants: list[str]) -> dict[str, Any]:
    """{variant: step closure} on one model, optimizer and batch."""
    torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    dev = torch.device(a["device"])
    model = _build(a).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, k = a["batch"], a["k"]
    batch = {
        "image": torch.randn(b, 3, a["image_size"], a["image_size"], device=dev),
        "texts": torch.randint(1, 1000, (b, k, a["context"]), device=dev),
        "pair_seed": torch.arange(b, device=dev) * 7919,
    }
    batch["texts"][..., -1] = 49407  # an EOT token in every row

    def one(v: str) -> Any:
        return train_step(lambda: _loss(model, batch, v), opt, dev, a["precision"])

    return {v: one(v) for v in variants}


def _rss_after_step(a: dict[str, Any], variant: str) -> float:
    """Peak RSS (MB) of this (fresh) process after building the model and one step."""
    _steps(a, [variant])[variant]()
    return vm_hwm_mb()


def _tcs_loss_only(a: dict[str, Any], repeats: int) -> dict[str, float]:
    """Forward + backward of the TCS loss alone, batched vs per-image loop, interleaved."""
    from finegrain.heads.pooling import TextConditionedPooling
    from finegrain.losses.flair import text_conditioned_sigmoid_loss

    torch.manual_seed(0)
    dev, b, k, d = torch.device(a["device"]), a["loss_batch"], a["k"], a["embed"]
    n = (a["image_size"] // a["patch"]) ** 2
    pool = TextConditionedPooling(d, heads=a["pool_heads"]).to(dev)
    tokens = torch.randn(b, n, d, device=dev, requires_grad=True)
    texts = torch.randn(b, k, d, device=dev, requires_grad=True)
    seeds = torch.arange(b, device=dev) * 7919
    fns = {
        "batched": lambda: text_conditioned_sigmoid_loss(
            pool, tokens, texts, 10.0, -10.0, pair_seed=seeds
        ).backward(),
        "loop": lambda: per_image_loop_tcs(pool, tokens, texts, 10.0, -10.0, seeds).backward(),
    }
    t = time_interleaved(fns, repeats=repeats, warmup=1, device=dev)
    return {f"{name}_s": v["median_s"] for name, v in t.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_variant_args(p, sorted(PRESETS), "tiny")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--loss-batch", type=int, default=0, help="batch of the loss-only timing (0: --batch)"
    )
    for key, val in PRESETS["tiny"].items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"tiny: {val}")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.preset, ns.repeats = "tiny", min(ns.repeats, 2)
    dev = torch.device(ns.device)
    a = dict(PRESETS[ns.preset])
    a.update({k: v for k, v in vars(ns).items() if v is not None and k in a})
    a.update(device=ns.device, precision=ns.precision if dev.type == "cuda" else "fp32",
             threads=ns.threads, loss_batch=ns.loss_batch or a["batch"])  # fmt: skip
    variants = [v for v in ns.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; valid choices: {', '.join(VARIANTS)}")
    rss = None if ns.no_memory else functools.partial(run_in_subprocess, _rss_after_step, a)
    s = time_steps(_steps(a, variants), a["batch"], ns.repeats, dev, rss)
    mem = "step_peak_mem_mb" if dev.type == "cuda" else "process_peak_rss_mb"
    ratios = {}
    if "flair" in s and "flair_loop" in s:
        ratios["batched_tcs_step_speed_ratio"] = s["flair_loop"]["step_s"] / s["flair"]["step_s"]
        if mem in s["flair"]:
            ratios["batched_tcs_peak_mem_ratio"] = s["flair"][mem] / s["flair_loop"][mem]
    if "flair" in s and "mps" in s:
        ratios["tcs_branch_step_time_ratio"] = s["flair"]["step_s"] / s["mps"]["step_s"]
    tcs = _tcs_loss_only(a, 2 * ns.repeats)
    ratios["batched_tcs_loss_speed_ratio"] = tcs["loop_s"] / tcs["batched_s"]
    return {"benchmark": "flair", "config": a, "steps": s, "tcs_loss": tcs, "ratios": ratios,
            "machine": machine_info(dev)}  # fmt: skip


if __name__ == "__main__":
    print_json(main())
