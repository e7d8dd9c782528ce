"""FLAIR training step vs CLIP training step (same towers, same batch), and FLAIR's batched
text-conditioned sigmoid loss vs a straightforward per-image loop. Prints one JSON object.

Variants (timed round-robin on one model, so all see the same machine load):
- ``clip``: global InfoNCE, one caption per image (``texts[:, 0]``);
- ``mps``: the multi-positive sigmoid loss on all B x K sub-captions (FLAIR without the
  text-conditioned branch: the same text-tower workload as FLAIR);
- ``flair``: finegrain's FLAIR step (batched pooling of all B x (B + K - 1) pairs);
- ``flair_loop``: the same step with the text-conditioned loss computed image by image.
Plus ``tcs_loss``: forward + backward of the text-conditioned loss alone on random features,
batched vs per-image loop (no towers).

CPU defaults are tiny; ``--preset vitb16 --device cuda`` is the paper's ViT-B/16, batch 128,
K = 8 setup (bf16 autocast). Peak memory: on GPU the peak a step allocates on top of the
model/optimizer state (``max_memory_allocated``); on CPU the max RSS of a fresh process that
runs one step of the variant.

    python benchmarks/bench_flair.py                       # CPU, tiny
    python benchmarks/bench_flair.py --preset vitb16 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import resource
import time
from typing import Any

import torch
import torch.nn.functional as F

VARIANTS = ("clip", "mps", "flair", "flair_loop")
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
    from finegrain.losses.contrastive import clip_loss

    scale, bias = model.logit_scale.exp(), model.logit_bias
    if variant == "clip":
        img = model.encode_image(batch["image"])
        txt = model.encode_text(batch["texts"][:, 0])
        return clip_loss(img, txt, scale)
    if variant == "mps":
        from finegrain.losses.flair import flair_multi_positive_loss

        f = model.features(batch)
        return flair_multi_positive_loss(
            F.normalize(f["image"], dim=-1), F.normalize(f["texts"], dim=-1), scale, bias
        )
    if variant == "flair":
        return model(batch).loss
    f = model.features(batch)  # flair_loop: same step, loop-based text-conditioned loss
    from finegrain.losses.flair import flair_multi_positive_loss

    tcs = per_image_loop_tcs(
        model.pooling, f["image_tokens"], f["texts"], scale, bias, f["pair_seed"]
    )
    mps = flair_multi_positive_loss(
        F.normalize(f["image"], dim=-1), F.normalize(f["texts"], dim=-1), scale, bias
    )
    return (tcs + mps) / 2


def _setup(a: dict[str, Any]) -> tuple[Any, Any, dict[str, torch.Tensor], Any]:
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
    amp = a["device"] == "cuda" and a["precision"] == "bf16"
    ctx = (lambda: torch.autocast("cuda", torch.bfloat16)) if amp else contextlib.nullcontext
    return model, opt, batch, ctx


def _step(model, opt, batch, variant: str, ctx) -> float:
    """One optimizer step; returns its wall time (seconds, synchronised on GPU)."""
    cuda = batch["image"].is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with ctx():
        loss = _loss(model, batch, variant)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _time_interleaved(a: dict[str, Any], variants: list[str]) -> dict[str, dict[str, float]]:
    """Round-robin over variants on one model, so every variant sees the same machine load.
    On GPU also the peak memory a step adds on top of what was allocated before it."""
    model, opt, batch, ctx = _setup(a)
    cuda = a["device"] == "cuda"
    times: dict[str, list[float]] = {v: [] for v in variants}
    extra: dict[str, float] = {v: 0.0 for v in variants}
    for step in range(a["warmup"] + a["steps"]):
        for v in variants:
            if cuda:
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            dt = _step(model, opt, batch, v, ctx)
            if step >= a["warmup"]:
                times[v].append(dt)
                if cuda:
                    extra[v] = max(extra[v], (torch.cuda.max_memory_allocated() - base) / 2**20)
    out = {}
    for v in variants:
        ts = sorted(times[v])
        out[v] = {
            "step_s": ts[len(ts) // 2],
            "min_step_s": ts[0],
            "samples_per_s": a["batch"] / ts[len(ts) // 2],
        }
        if cuda:
            out[v]["step_peak_mem_mb"] = extra[v]
    return out


def _rss_after_step(a: dict[str, Any], variant: str, queue: Any) -> None:
    model, opt, batch, ctx = _setup(a)
    _step(model, opt, batch, variant, ctx)
    queue.put(_vm_hwm_mb())


def _vm_hwm_mb() -> float:
    """This process's peak RSS (MiB). /proc VmHWM is reset by exec, unlike ru_maxrss, which a
    spawned child inherits from its parent on Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB -> MiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def _cpu_peak_rss(a: dict[str, Any], variant: str) -> float:
    """Max RSS (MiB) of a fresh process that builds the model and runs one step of ``variant``."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_rss_after_step, args=(a, variant, q))
    p.start()
    out = q.get()
    p.join()
    return out


def _tcs_loss_only(a: dict[str, Any]) -> dict[str, float]:
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
        ),
        "loop": lambda: per_image_loop_tcs(pool, tokens, texts, 10.0, -10.0, seeds),
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for step in range(a["warmup"] + 2 * a["steps"]):
        for name, fn in fns.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn().backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if step >= a["warmup"]:
                times[name].append(time.perf_counter() - t0)
    out = {f"{name}_s": sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    out["loop_over_batched"] = out["loop_s"] / out["batched_s"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the per-variant RSS runs")
    p.add_argument(
        "--loss-batch", type=int, default=0, help="batch of the loss-only timing (0: --batch)"
    )
    for key, val in PRESETS["tiny"].items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"tiny: {val}")
    ns = p.parse_args(argv)
    a = dict(PRESETS[ns.preset])
    a.update({k: v for k, v in vars(ns).items() if v is not None and k in a})
    a.update(device=ns.device, precision=ns.precision if ns.device == "cuda" else "fp32",
             steps=ns.steps, warmup=ns.warmup, threads=ns.threads,
             loss_batch=ns.loss_batch or a["batch"])  # fmt: skip
    variants = [v for v in ns.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; valid choices: {', '.join(VARIANTS)}")
    res: dict[str, Any] = {"config": a, "steps": _time_interleaved(a, variants)}
    s = res["steps"]
    mem_key = "step_peak_mem_mb" if a["device"] == "cuda" else "process_peak_rss_mb"
    if a["device"] != "cuda" and not ns.no_memory:
        for v in variants:
            s[v][mem_key] = _cpu_peak_rss(a, v)
    ratios = {}
    for num, den in (("flair", "clip"), ("flair", "mps"), ("flair_loop", "flair")):
        if num in s and den in s:
            ratios[f"{num}_over_{den}_step_time"] = s[num]["step_s"] / s[den]["step_s"]
            if mem_key in s[num]:
                ratios[f"{num}_over_{den}_peak_mem"] = s[num][mem_key] / s[den][mem_key]
    res["ratios"] = ratios
    res["tcs_loss"] = _tcs_loss_only(a)
    res["device_name"] = torch.cuda.get_device_name() if a["device"] == "cuda" else "cpu"
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
