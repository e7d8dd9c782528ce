"""Training throughput and peak memory of every method, each beside CLIP on the same towers.

One script for the six methods (CLIP, SigLIP, FLAIR, GRAIN, CLIPpy, DetailCLIP): each is built
from its ``<name>_vitb16`` recipe (the paper-scale configuration), fed real batches of its own
data pipeline (``Method.make_transform`` + ``make_collate`` over the built-in scenes: FLAIR's
sub-captions, GRAIN's boxes and descriptions, DetailCLIP's views and masks, CLIPpy's keep sets),
and timed for forward + backward + AdamW step, round-robin with the other methods
(``benchmarks._common.time_interleaved``) so machine load hits all alike. The reference of each
method is CLIP with the *same* towers and embedding size, timed in the same rounds: the ratio
``<method>_over_clip_step_time`` is the overhead a method's fine-grained objective costs (each
method's issue names its target). ``data_samples_per_s`` is the data pipeline alone (one
process, no workers), so data cost is excluded from the step times.

Sizes: on CUDA the recipes' ViT-B/16 towers at their own image size and batch ``--batch``
(default 128; bf16 autocast). On CPU (and with ``--quick``) the towers keep their kind and
options but shrink (ViT width 192, depth 4, 96 px; text width 128, depth 2) at batch 16.
Peak memory: CUDA ``max_memory_allocated`` during a step minus what was allocated before it;
CPU the peak RSS of a fresh process that builds the method and runs two steps (``--memory``).

    python benchmarks/bench_methods.py --quick                   # CPU, about 1-2 minutes
    python benchmarks/bench_methods.py --device cuda --batch 256 # GPU, ViT-B/16
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    cuda_step_peak_mb,
    machine_info,
    print_json,
    run_in_subprocess,
    time_interleaved,
    train_step,
    vm_hwm_mb,
)

METHODS = ("clip", "siglip", "flair", "grain", "clippy", "detailclip")
CPU_IMAGE = dict(width=192, depth=4, heads=3, image_size=96, patch_size=16)
CPU_TEXT = dict(width=128, depth=2, heads=2)


def run_config(name: str, small: bool, batch: int, notes: list[str] | None = None) -> Any:
    """The method's ViT-B/16 recipe, its towers shrunk when ``small``, synthetic data.
    Towers start from random weights (speed does not need the weights files); a Hugging Face
    text tower whose model folder is absent (CLIPpy's sentence-T5) becomes the native text
    transformer of the same width, said in ``notes``."""
    from finegrain.encoders.base import TextTowerConfig
    from finegrain.recipes.base import get_recipe

    cfg = get_recipe(f"{name}_vitb16")
    m = cfg.method
    image, text = m.image, m.text
    image = dataclasses.replace(image, pretrained="") if hasattr(image, "pretrained") else image
    text = dataclasses.replace(text, pretrained="") if hasattr(text, "pretrained") else text
    if text.name == "hf" and not Path(text.path).expanduser().is_dir():
        text = TextTowerConfig(name="transformer", context_length=77, width=image.width,
                               depth=12, heads=max(1, image.width // 64))  # fmt: skip
        if notes is not None:
            notes.append(f"{name}: hf text tower absent, native transformer of width {text.width}")
    if small:
        image = dataclasses.replace(image, name="vit", **CPU_IMAGE)
        text = dataclasses.replace(text, **CPU_TEXT)
    m = dataclasses.replace(m, image=image, text=text)
    if getattr(m, "caption_fields", None):  # FLAIR's DreamLIP pool: the scenes' own captions
        m = dataclasses.replace(m, caption_fields=[])
    if getattr(m, "projection", "") == "none":  # CLIPpy: both towers' width is the embedding
        m = dataclasses.replace(m, embed_dim=image.width,
                                text=dataclasses.replace(text, width=image.width, heads=image.heads))  # fmt: skip
    data = dataclasses.replace(cfg.data, source="synthetic", train="", batch_size=batch,
                               num_workers=0, image_size=image.image_size)  # fmt: skip
    return dataclasses.replace(cfg, method=m, data=data)


def clip_twin(cfg: Any) -> Any:
    """CLIP with the method's towers and embedding size (the reference of every ratio)."""
    from finegrain.methods.clip import CLIPConfig

    m = cfg.method
    return dataclasses.replace(cfg, method=CLIPConfig(image=m.image, text=m.text,
                                                      embed_dim=m.embed_dim))  # fmt: skip


def build(cfg: Any, device: torch.device) -> tuple[Any, Any, Any]:
    """(method, AdamW, loader iterator) for ``cfg``; one seed for every method."""
    from finegrain.data.for_method import method_loader
    from finegrain.methods.base import build_method

    torch.manual_seed(0)
    method = build_method(cfg.method).to(device).train()
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    loader = method_loader(method, cfg.data, seed=0)
    return method, opt, iter(loader)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def step_fn(method: Any, opt: Any, batch: dict[str, Any], precision: str, device: Any) -> Any:
    return train_step(lambda: method(batch).loss, opt, device, precision)


def data_rate(it: Any, batch: int, n: int = 3) -> tuple[float, list[dict[str, Any]]]:
    """Samples/s of the method's data pipeline alone, and the batches it made."""
    t0 = time.perf_counter()
    batches = [next(it) for _ in range(n)]
    return n * batch / (time.perf_counter() - t0), batches


def peak_rss_child(name: str, small: bool, batch: int) -> float:
    """Peak RSS (MB) of a process that builds ``name`` and runs two steps (in a subprocess)."""
    torch.set_num_threads(2)
    method, opt, it = build(run_config(name, small, batch), torch.device("cpu"))
    b = next(it)
    for _ in range(2):
        step_fn(method, opt, b, "fp32", "cpu")()
    return vm_hwm_mb()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small towers, batch 16 (CPU preset)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch", type=int, default=0, help="default: 128 on CUDA, 16 on CPU")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory", action="store_true", help="CPU: peak RSS per method (subprocess)")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    small = a.quick or dev.type == "cpu"
    batch = a.batch or (16 if small else 128)
    precision = a.precision if dev.type == "cuda" else "fp32"
    names = [n.strip() for n in a.methods.split(",") if n.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if dev.type == "cpu":
        torch.set_num_threads(2)
    fns: dict[str, Any] = {}
    out: dict[str, Any] = {"config": {"batch": batch, "precision": precision, "small": small,
                                      "cpu_image": CPU_IMAGE if small else None,
                                      "cpu_text": CPU_TEXT if small else None}}  # fmt: skip
    per: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for name in names:
        cfg = run_config(name, small, batch, notes)
        for label, c in ((name, cfg), (f"{name}:clip", clip_twin(cfg))):
            if label == "clip:clip":
                continue
            method, opt, it = build(c, dev)
            rate, batches = data_rate(it, batch)
            fns[label] = step_fn(method, opt, to_device(batches[0], dev), precision, dev)
            per[label] = {"params_m": sum(q.numel() for q in method.parameters()) / 1e6,
                          "data_samples_per_s": rate}  # fmt: skip
            if dev.type == "cuda":
                fns[label]()  # warm-up, then one measured step
                per[label]["step_peak_mem_mb"] = cuda_step_peak_mb(fns[label])
    times = time_interleaved(fns, repeats=a.repeats, warmup=1, device=dev)
    ratios: dict[str, float] = {}
    for label, t in times.items():
        per[label].update(step_s=t["median_s"], cpu_s=t["cpu_s"],
                          samples_per_s=batch / t["median_s"])  # fmt: skip
    for name in names:
        ref = "clip" if name == "clip" else f"{name}:clip"
        if name != "clip":
            ratios[f"{name}_over_clip_step_time_ratio"] = per[name]["step_s"] / per[ref]["step_s"]
            ratios[f"{name}_over_clip_cpu_time_ratio"] = per[name]["cpu_s"] / per[ref]["cpu_s"]
            if "step_peak_mem_mb" in per[name]:
                m = per[name]["step_peak_mem_mb"] / max(per[ref]["step_peak_mem_mb"], 1e-9)
                ratios[f"{name}_over_clip_peak_mem_ratio"] = m
    if a.memory and dev.type == "cpu":
        for name in names:
            per[name]["process_peak_rss_mb"] = run_in_subprocess(peak_rss_child, name, small, batch)
    out.update(methods=per, ratios=ratios, notes=notes, machine=machine_info(dev))
    print_json(out)
    return out


if __name__ == "__main__":
    main()
