"""Region classification: RoIAlign over each image's dense features vs crop-and-encode.

    python benchmarks/bench_region_cls.py            # ViT-B/16 at 224 px, 64 images, batch 32
    python benchmarks/bench_region_cls.py --quick    # 2 CPU cores: ViT-Ti/16 at 224, 16 images, batch 16

Both sides run ``finegrain.eval.regions.evaluate_regions`` on the same ``RegionData`` (built-in
scenes, each object's true box plus random boxes up to ``--boxes-per-image``; default 12, about
LVIS v1 val's density, COCO val2017 has about 7) with the same config except ``mode``, so box
checks, class vectors (cached after warm-up), scoring and metrics are identical:
- ``crop``: every box cropped, resized to 224 and encoded (one image-tower pass per box);
- ``roialign``: one ``dense_features`` pass per image, RoIAlign-pooled for all its boxes.
``speed_ratio`` = crop seconds / roialign seconds (``cpu_ratio`` from process CPU time). The
ratio grows with boxes per image (crop costs ~ K tower passes per image, RoIAlign ~ 1); the
per-box and per-image costs are reported so other densities can be read off.
``cached_ratio``: crop-and-encode vs a later ``roialign`` task on the same images in the same
run, whose dense maps come from the run's feature cache (``feature_cache_mb``): image decode,
content hash, RoIAlign, scoring and metrics only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info, print_json, time_interleaved  # noqa: E402

PRESETS = {
    "vitb16": dict(width=768, depth=12, heads=12),
    "vitti16": dict(width=192, depth=12, heads=3),
}


def _method(preset: str, device: str) -> Any:
    import finegrain.encoders  # noqa: F401  (registers the towers)
    from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
    from finegrain.methods.base import build_method
    from finegrain.recipes.base import method_config

    torch.manual_seed(0)
    image = ImageTowerConfig(name="vit", image_size=224, patch_size=16, **PRESETS[preset])
    text = TextTowerConfig(name="transformer", context_length=16, width=64, depth=1, heads=2)
    return build_method(method_config("clip", embed_dim=256, image=image, text=text)).to(device)


def _data(num_images: int, boxes_per_image: int, image_size: int) -> Any:
    """Scenes with their true boxes plus seeded random boxes (random labels) up to K each."""
    from finegrain.eval.region_data import RegionData, synthetic_regions

    d = synthetic_regions("shape", num_images, image_size)
    g = torch.Generator().manual_seed(0)
    boxes, labels = [], []
    for bs, ys in zip(d.boxes, d.labels):
        extra = max(0, boxes_per_image - len(bs))
        xy = torch.rand(extra, 2, generator=g) * image_size * 0.8
        wh = (0.05 + 0.4 * torch.rand(extra, 2, generator=g)) * image_size
        boxes.append(bs[:boxes_per_image] + torch.cat([xy, xy + wh], 1).tolist())
        more = torch.randint(len(d.classnames), (extra,), generator=g).tolist()
        labels.append(ys[:boxes_per_image] + more)
    return RegionData(d.images, boxes, labels, d.classnames, d.descriptions)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="vitb16")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--boxes-per-image", type=int, default=12)
    p.add_argument("--source-size", type=int, default=320, help="side of the scene images")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--quick", action="store_true", help="CPU preset: ViT-Ti/16, 16 images, batch 16, 1 repeat"
    )
    a = p.parse_args(argv)
    if a.quick:  # images >= batch: both sides run full batches, as on a real dataset
        a.preset, a.images, a.batch, a.repeats = "vitti16", 16, 16, 1
    from finegrain.eval.common import EvalContext
    from finegrain.eval.config import RegionTaskConfig
    from finegrain.eval.region_data import RegionData
    from finegrain.eval.regions import evaluate_regions

    method = _method(a.preset, a.device).eval()
    data = _data(a.images, a.boxes_per_image, a.source_size)
    ctx = EvalContext.create(method, a.device, progress=False)
    common = dict(batch_size=a.batch, templates="plain")
    cfgs = {  # feature_cache_mb=0: roialign computes every image's features in the timed run
        "crop": RegionTaskConfig(mode="crop", **common),
        "roialign": RegionTaskConfig(mode="roialign", feature_cache_mb=0, **common),
        "cached": RegionTaskConfig(mode="roialign", feature_cache_mb=1 << 16, **common),
    }
    results: dict[str, Any] = {}

    def run(mode: str) -> Any:
        def fn() -> None:
            with torch.inference_mode():
                results[mode] = evaluate_regions(ctx, cfgs[mode], data)

        return fn

    one = RegionData(data.images[-1:], data.boxes[-1:], data.labels[-1:], data.classnames)
    with torch.inference_mode():  # warm-up: class vectors cached, kernels loaded
        for mode in ("crop", "roialign"):
            evaluate_regions(ctx, cfgs[mode], one)
    t = time_interleaved({m: run(m) for m in ("crop", "roialign")}, a.repeats, 0, a.device)
    # a later task on the same images: the dense maps come from the run's cache
    t.update(time_interleaved({"cached": run("cached")}, a.repeats, 1, a.device))
    cards = {m: results[m][1]["protocol"] for m in cfgs}
    assert len({c["n_regions"] for c in cards.values()}) == 1, "same boxes on every side"
    assert results["cached"][0]["acc1"] == results["roialign"][0]["acc1"], "cache changes nothing"
    n_boxes, n_images = cards["crop"]["n_regions"], cards["crop"]["n_images"]
    out: dict[str, Any] = {"benchmark": "region_cls", "args": vars(a)}
    out["machine"] = machine_info(a.device)
    out.update(n_images=n_images, n_regions=n_boxes)
    for m in cfgs:
        out[f"{m}_s"] = t[m]["median_s"]
        out[f"{m}_cpu_s"] = t[m]["cpu_s"]
        out[f"{m}_acc1"] = results[m][0]["acc1"]
    out["crop_ms_per_box"] = 1e3 * t["crop"]["median_s"] / n_boxes
    out["roialign_ms_per_image"] = 1e3 * t["roialign"]["median_s"] / n_images
    out["cached_ms_per_box"] = 1e3 * t["cached"]["median_s"] / n_boxes
    out["speed_ratio"] = t["crop"]["median_s"] / t["roialign"]["median_s"]
    out["cpu_ratio"] = t["crop"]["cpu_s"] / max(t["roialign"]["cpu_s"], 1e-9)
    out["cached_ratio"] = t["crop"]["median_s"] / t["cached"]["median_s"]
    out["cached_cpu_ratio"] = t["crop"]["cpu_s"] / max(t["cached"]["cpu_s"], 1e-9)
    return out


if __name__ == "__main__":
    print_json(main())
