"""Locked-tower feature caching: one training step from cached frozen-bottom features vs the
uncached step (decode + full towers), side by side in one run.

    python benchmarks/bench_feature_cache.py            # clip_flickr8k sizes: 160 px, batch 128
    python benchmarks/bench_feature_cache.py --quick    # 2 CPU cores: 96 px, batch 32
    python benchmarks/bench_feature_cache.py --data flickr8k   # real JPEGs (skips when absent)

Both paths train the same model: ``clip_flickr8k``'s towers (pretrained EfficientNet-Lite0, its
last 3 blocks trained; MiniLM, its last 2 layers trained), ``lock_frozen`` on both towers so
the frozen bottoms are the same function with and without the cache. A step is: next batch
from the loader, forward, backward, AdamW update. Uncached: decode + transform + full towers
(the train transform); cached: rows of the memory-mapped stores + the towers' trainable
suffixes (``finegrain.data.feature_cache``). ``cached_step_ratio`` = uncached / cached seconds
per step (higher is better); ``build_s`` is the one-off cost of building the stores, also
as the number of uncached steps it equals.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info, print_json, time_interleaved  # noqa: E402


def _config(a: argparse.Namespace, cache: str) -> Any:
    from finegrain.data.config import DataConfig, SyntheticConfig
    from finegrain.recipes.base import IMAGENET_MEAN, IMAGENET_STD, get_recipe

    cfg = get_recipe("clip_flickr8k")
    cfg.method.image.image_size = a.image_size
    cfg.method.image.lock_frozen = cfg.method.text.lock_frozen = True
    if a.data == "flickr8k":
        data = cfg.data
        if not Path(data.train).is_file():
            return None
        data.image_size, data.batch_size = a.image_size, a.batch
    else:  # enough scenes for warm-up + repeats of both loaders
        n = a.batch * (2 * a.repeats + 4)
        data = DataConfig(source="synthetic", batch_size=a.batch, image_size=a.image_size,
                          augment="rrc", crop_scale=(0.8, 1.0), mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, synthetic=SyntheticConfig(num_samples=n))  # fmt: skip
    data.num_workers, data.feature_cache = 0, cache
    cfg.data = data
    return cfg


def _stepper(method: Any, loader: Any) -> Any:
    opt = torch.optim.AdamW(method.param_groups(0.05), lr=1e-4)
    it = iter(loader)

    def step() -> None:
        batch = next(it)
        opt.zero_grad(set_to_none=True)
        method(batch).loss.backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", choices=["synthetic", "flickr8k"], default="synthetic")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small CPU preset (96 px, batch 32)")
    a = p.parse_args(argv)
    if a.quick:
        a.image_size, a.batch, a.repeats = 96, 32, 2
    from finegrain.data.for_method import method_loader
    from finegrain.methods.base import build_method

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(a, tmp)
        if cfg is None:
            return {"benchmark": "feature_cache", "skipped": "Flickr8k data absent"}
        torch.manual_seed(0)
        method = build_method(cfg.method).to(a.device).train()
        plain = method_loader(method, dataclasses.replace(cfg.data, feature_cache=""))
        t0 = time.perf_counter()
        cached = method_loader(method, cfg.data, device=a.device)  # builds the stores
        build_s = time.perf_counter() - t0
        times = time_interleaved(
            {"uncached": _stepper(method, plain), "cached": _stepper(method, cached)},
            repeats=a.repeats,
            warmup=1,
            device=a.device,
        )
        images, captions = len(cached.collate.image), len(cached.collate.tokens)
    u, c = times["uncached"], times["cached"]
    return {
        "benchmark": "feature_cache",
        "machine": machine_info(a.device),
        "config": {
            "image_size": a.image_size,
            "batch": a.batch,
            "repeats": a.repeats,
            "data": a.data,
            "cached_images": images,
            "cached_captions": captions,
        },  # fmt: skip
        "uncached_step_s": u["median_s"],
        "cached_step_s": c["median_s"],
        "uncached_samples_per_s": a.batch / u["median_s"],
        "cached_samples_per_s": a.batch / c["median_s"],
        "cached_step_ratio": u["median_s"] / c["median_s"],
        "cached_step_cpu_ratio": u["cpu_s"] / max(c["cpu_s"], 1e-9),
        "build_s": build_s,
        "build_in_uncached_steps": build_s / u["median_s"],
    }


if __name__ == "__main__":
    print_json(main())
