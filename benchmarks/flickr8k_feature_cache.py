"""Flickr8k R@1 vs wall time, uncached (``clip_flickr8k``) vs cached (``clip_flickr8k_cached``).

    python benchmarks/flickr8k_feature_cache.py                      # shortened schedule
    python benchmarks/flickr8k_feature_cache.py --train-images 0 --eval-images 0 \\
        --uncached-steps 170 --cached-steps 300                    # the recipes' full budgets

Real data only (``finegrain.recipes.base.data_path("flickr8k/captions.jsonl")``; prints a
"skipped" JSON when absent). Both recipes train the same model (pretrained EfficientNet-Lite0,
last 3 blocks; MiniLM, last 2 layers; ``lock_frozen`` in the cached one); a shortened run uses
the first ``--train-images`` training images and the first ``--eval-images`` test images.
Runs, in order: uncached; cached with a cold cache (the build is timed apart); cached again on
the warm cache for each further step count. Every run reports its training wall time (model +
loader construction, which includes any cache build, plus the steps) and the test retrieval
R@1 (evaluated apart, not in the wall time). Not part of ``python -m benchmarks`` (minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info, print_json  # noqa: E402


def _subset(manifest: Path, n_train: int, out: Path) -> Path:
    """A manifest with the first ``n_train`` train rows (0 = all) and every other row, next to
    a link to the image folder."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    keep = (train[:n_train] if n_train else train) + [r for r in rows if r.get("split") != "train"]
    out.mkdir(parents=True, exist_ok=True)
    # absolute: a relative target (FINEGRAIN_DATA=../shared/data) would resolve from ``out``
    (out / "images").symlink_to(manifest.resolve().parent / "images")
    path = out / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return path


def _run(recipe: str, steps: int, manifest: Path, eval_images: int, cache: Path,
         out: Path) -> dict[str, Any]:  # fmt: skip
    import dataclasses

    from finegrain.eval import run_tasks
    from finegrain.eval.config import EvalConfig
    from finegrain.recipes.base import get_recipe
    from finegrain.train.trainer import Trainer

    cfg = get_recipe(recipe)
    task = dataclasses.replace(cfg.eval.tasks[0], path=str(manifest.parent), limit=eval_images)
    cfg.data.train, cfg.data.feature_cache = (
        str(manifest),
        str(cache) if cfg.data.feature_cache else "",
    )
    cfg.eval = EvalConfig(tasks=[])
    cfg.train = dataclasses.replace(cfg.train, steps=steps, warmup_steps=max(1, steps // 10),
                                    checkpoint_every=0, progress=False, log_every=max(1, steps // 4))  # fmt: skip
    t0 = time.perf_counter()
    trainer = Trainer(cfg, output_dir=str(out / f"{recipe}-{steps}"), overwrite=True)
    setup_s = time.perf_counter() - t0
    trainer.fit()
    wall_s = time.perf_counter() - t0
    epochs = steps * cfg.data.batch_size / len(trainer.loader.source)
    metrics = run_tasks(trainer.method, [task], device="cpu", progress=False, data_cfg=cfg.data)
    r1 = {k.rsplit("/", 1)[-1]: round(100 * v, 2) for k, v in metrics.items() if "recall@1" in k}
    return {"recipe": recipe, "steps": steps, "epochs": round(epochs, 2),
            "setup_s": round(setup_s, 1), "train_wall_s": round(wall_s, 1), **r1}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-images", type=int, default=1024, help="0 = all 6000")
    p.add_argument("--eval-images", type=int, default=300, help="0 = all 1000")
    p.add_argument("--uncached-steps", type=int, default=16)
    p.add_argument("--cached-steps", default="16,48", help="comma list; the first builds")
    a = p.parse_args(argv)
    from finegrain.recipes.base import data_path

    manifest = Path(data_path("flickr8k/captions.jsonl"))
    if not manifest.is_file():
        return {"benchmark": "flickr8k_feature_cache", "skipped": f"{manifest} absent"}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        sub = _subset(manifest, a.train_images, Path(tmp) / "data")
        cache, out = Path(tmp) / "cache", Path(tmp) / "runs"
        runs.append(_run("clip_flickr8k", a.uncached_steps, sub, a.eval_images, cache, out))
        print(json.dumps(runs[-1]), flush=True)
        for steps in [int(s) for s in a.cached_steps.split(",")]:
            runs.append(_run("clip_flickr8k_cached", steps, sub, a.eval_images, cache, out))
            print(json.dumps(runs[-1]), flush=True)
    return {"benchmark": "flickr8k_feature_cache", "machine": machine_info("cpu"),
            "config": vars(a), "runs": runs}  # fmt: skip


if __name__ == "__main__":
    print_json(main())
