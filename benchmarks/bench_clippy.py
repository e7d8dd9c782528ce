"""CLIPpy training step vs CLIP training step (same towers, same batch), with and without the
paper's token sub-sampling at 2x resolution (Ranasinghe et al., ICCV 2023, Sec. 3.4). Prints
one JSON object.

Variants (timed round-robin, so all see the same machine load):
- ``clip_1x``: CLIP (CLS pooling) at the base resolution, all tokens;
- ``clippy_1x``: CLIPpy (max pooling over projected patch tokens) at the base resolution;
- ``clippy_2x``: CLIPpy at 2x resolution, all (4x as many) tokens;
- ``clippy_2x_keep``: CLIPpy at 2x resolution keeping ``--keep`` (0.2) of the patch tokens,
  the keep sets drawn per sample as in training (``finegrain.methods.clippy.sample_keep``).
The paper's point: ``clippy_2x_keep`` must be cheaper than ``clip_1x`` / ``clippy_1x``
(0.2 x 4 = 0.8 of the 1x tokens); ``checks`` reports it.

Peak memory: on GPU the peak a step adds on top of the model/optimizer state
(``max_memory_allocated``); on CPU the max RSS of a fresh process running one step.

    python benchmarks/bench_clippy.py                          # CPU, small
    python benchmarks/bench_clippy.py --preset vitb16 --device cuda
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

VARIANTS = ("clip_1x", "clippy_1x", "clippy_2x", "clippy_2x_keep")
PRESETS = {
    "small": dict(batch=16, image_size=64, patch=8, width=192, depth=4, heads=3, text_width=64,
                  text_depth=2, text_heads=2, context=32, embed=64),
    "vitb16": dict(batch=128, image_size=224, patch=16, width=768, depth=12, heads=12,
                   text_width=512, text_depth=12, text_heads=8, context=77, embed=512),
}  # fmt: skip


def _build(a: dict[str, Any], method: str) -> Any:
    import finegrain.encoders  # noqa: F401  (registers the towers)
    from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
    from finegrain.methods.base import build_method
    from finegrain.recipes.base import method_config

    torch.manual_seed(0)
    image = ImageTowerConfig(name="vit", image_size=a["image_size"], patch_size=a["patch"],
                             width=a["width"], depth=a["depth"], heads=a["heads"])  # fmt: skip
    text = TextTowerConfig(name="transformer", context_length=a["context"], pooling="mean",
                           width=a["text_width"], depth=a["text_depth"], heads=a["text_heads"])  # fmt: skip
    return build_method(method_config(method, embed_dim=a["embed"], image=image, text=text))


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


def _setup(a: dict[str, Any]) -> tuple[dict, dict, dict, Any]:
    torch.set_num_threads(a["threads"])
    dev = torch.device(a["device"])
    models = {m: _build(a, m).to(dev).train() for m in ("clip", "clippy")}
    opts = {m: torch.optim.AdamW(models[m].parameters(), lr=1e-4) for m in models}
    batches = {v: _batch(a, v, dev) for v in VARIANTS}
    amp = a["device"] == "cuda" and a["precision"] == "bf16"
    ctx = (lambda: torch.autocast("cuda", torch.bfloat16)) if amp else contextlib.nullcontext
    return models, opts, batches, ctx


def _step(model: Any, opt: Any, batch: dict[str, torch.Tensor], ctx: Any) -> float:
    """One optimizer step; returns its wall time (seconds, synchronised on GPU)."""
    cuda = batch["image"].is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with ctx():
        loss = model(batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _time_interleaved(a: dict[str, Any], variants: list[str]) -> dict[str, dict[str, float]]:
    models, opts, batches, ctx = _setup(a)
    cuda = a["device"] == "cuda"
    times: dict[str, list[float]] = {v: [] for v in variants}
    extra = dict.fromkeys(variants, 0.0)
    for step in range(a["warmup"] + a["steps"]):
        for v in variants:
            m = v.split("_")[0]
            if cuda:
                opts[m].zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            dt = _step(models[m], opts[m], batches[v], ctx)
            if step >= a["warmup"]:
                times[v].append(dt)
                if cuda:
                    extra[v] = max(extra[v], (torch.cuda.max_memory_allocated() - base) / 2**20)
    out = {}
    for v in variants:
        ts = sorted(times[v])
        med = ts[len(ts) // 2]
        out[v] = {"step_s": med, "min_step_s": ts[0], "samples_per_s": a["batch"] / med}
        if cuda:
            out[v]["step_peak_mem_mb"] = extra[v]
    return out


def _vm_hwm_mb() -> float:
    """This process's peak RSS (MiB) from /proc VmHWM (reset by exec, unlike ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def _rss_after_step(a: dict[str, Any], variant: str, queue: Any) -> None:
    torch.set_num_threads(a["threads"])
    m = variant.split("_")[0]
    model = _build(a, m).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _step(model, opt, _batch(a, variant, torch.device("cpu")), contextlib.nullcontext)
    queue.put(_vm_hwm_mb())


def _cpu_peak_rss(a: dict[str, Any], variant: str) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_rss_after_step, args=(a, variant, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--keep", type=float, default=0.2, help="kept fraction at 2x (paper: 0.2)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the per-variant RSS runs")
    ns = p.parse_args(argv)
    from finegrain.methods.clippy import check_keep_fraction

    a = dict(PRESETS[ns.preset])
    a.update(device=ns.device, precision=ns.precision if ns.device == "cuda" else "fp32",
             steps=ns.steps, warmup=ns.warmup, threads=ns.threads,
             keep=check_keep_fraction(ns.keep, "--keep"))  # fmt: skip
    if ns.batch:
        a["batch"] = ns.batch
    res: dict[str, Any] = {"config": a, "steps": _time_interleaved(a, list(VARIANTS))}
    s = res["steps"]
    mem = "step_peak_mem_mb" if a["device"] == "cuda" else "process_peak_rss_mb"
    if a["device"] != "cuda" and not ns.no_memory:
        for v in VARIANTS:
            s[v][mem] = _cpu_peak_rss(a, v)
    ratios = {}
    for num, den in (("clippy_1x", "clip_1x"), ("clippy_2x", "clippy_1x"),
                     ("clippy_2x_keep", "clippy_1x"), ("clippy_2x_keep", "clip_1x")):  # fmt: skip
        ratios[f"{num}_over_{den}_step_time"] = s[num]["step_s"] / s[den]["step_s"]
        if mem in s[num]:
            ratios[f"{num}_over_{den}_peak_mem"] = s[num][mem] / s[den][mem]
    res["ratios"] = ratios
    res["checks"] = {
        "subsampled_2x_cheaper_than_full_1x": s["clippy_2x_keep"]["step_s"]
        < s["clippy_1x"]["step_s"]
    }
    res["device_name"] = torch.cuda.get_device_name() if a["device"] == "cuda" else "cpu"
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
