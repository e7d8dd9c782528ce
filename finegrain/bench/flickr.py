"""``finegrain demo --suite flickr8k --data DIR``: every method that learns from image-caption
pairs, trained on Flickr8k train with the same towers and budget, evaluated on the test split.

    finegrain demo --suite flickr8k --data ../shared/data/flickr8k            # the comparison
    finegrain demo --suite flickr8k --data ../shared/data/flickr8k --quick    # a smoke, seconds
    finegrain demo --suite flickr8k --data DIR --methods clip,flair --steps 600

Towers, shared by every method (``FlickrBudget``): the *hybrid* image tower
(``finegrain.encoders.hybrid``: the ImageNet-pretrained EfficientNet-Lite0 from PyPI up to output
stride 32, frozen, then a small trainable transformer with a class token over its 4 x 4 feature
map at 128 px, so CLIPpy's max pooling, FLAIR's text-conditioned pooling and DetailCLIP's token
removal and masking all run on it) and the pretrained all-MiniLM-L6-v2 sentence encoder, locked
(``text_trainable`` top blocks train; default 0: the projection on its mean-pooled output
trains). The frozen bottoms are the same function for every method, so they are computed once
per suite (the image bottom per image, ``shared_bottom_cache``; the text prefix per caption,
``finegrain.encoders.prefix_cache``) before any method trains, test images and captions included.

Data: the manifest's ``train`` rows (6,000 images x 5 captions; one caption drawn per image and
step, FLAIR draws its K sub-captions from the 5), images resized and centre-cropped (no random
crops: the bottom's output is then cached; DetailCLIP draws its own augmented views). Test: the
``test`` rows (1,000 images, 5,000 captions), text-to-image and image-to-text R@1/5/10, global
scoring for all methods and text-conditioned scoring where a method has it (FLAIR). GRAIN needs
region descriptions with boxes (a ``regions`` field in the manifest); without them it is n/a.

Layout of ``--out``: ``report.md``, ``results.json``, ``*.png`` (retrieval examples) and
``runs/<method>/seed<k>/`` (a normal run directory: ``config.yaml`` whose ``eval`` is the
Flickr8k test retrieval, ``checkpoints/``, ``summary.json``, ``train_log.jsonl``; load it with
``finegrain.load(path)``, evaluate it with ``finegrain eval --checkpoint path``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finegrain.bench.config import (
    CACHED_VIEWS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    resolve_precision,
)
from finegrain.bench.run import MethodRun, TimedLoader, _accepts, check_output
from finegrain.bench.tasks import NA, TaskResult, per_image_values
from finegrain.data.config import DataConfig
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.eval.config import EvalConfig, RetrievalTaskConfig

MANIFEST = "captions.jsonl"
SUITE_METHODS = ("clip", "flair", "siglip", "clippy", "detailclip", "grain")  # run order
REGION_METHODS = ("grain",)  # train on region descriptions with boxes


@dataclass(frozen=True)
class FlickrBudget:
    """What every method of one Flickr8k suite run shares (documented in the report)."""

    steps: int = 300
    batch_size: int = 128
    image_size: int = 192  # 6 x 6 tokens at stride 32 (DetailCLIP's 2 x 2 blocks need even)
    patch_size: int = 32  # the hybrid bottom's output stride
    lr: float = 1e-3  # linear warmup over the first 10% of steps, then cosine to 0
    weight_decay: float = 0.05
    embed_dim: int = 256
    image_width: int = 256
    image_depth: int = 2
    image_heads: int = 4
    bottom_trainable: int = 0  # Lite0's last MBConv blocks (+ its head conv) that train
    # the hybrid's readout: avg (mean of its tokens) | tok (CLS). With zero_init_residual its
    # blocks start as the identity, so the tower starts as the mean of Lite0's projected
    # features and its top learns what to add (docs/flickr8k/levers.md: +0.9 to +1.3 T2I R@1)
    image_pool: str = "avg"
    zero_init_residual: bool = True
    text_trainable: int = 0  # MiniLM's top blocks that train (0: its projection only)
    context_length: int = 32  # captions: 14 MiniLM tokens at the median, 36 at most
    flair_k: int = 4  # FLAIR's sub-captions per image
    flair_max_captions: int = 1  # each a concatenation of 1..this many of the 5 captions
    train_limit: int = 0  # keep the first N training images (0 = all; the smoke)
    eval_images: int = 0  # test images (0 = all 1,000)
    workers: int = 1
    device: str = "cpu"
    # training autocast: auto = bf16 where the hardware computes it natively (a CPU with
    # AVX512-BF16 or AMX, a CUDA GPU with bf16), else fp32; the report records what ran.
    # Measured on a 2-core AMD EPYC (AVX512-BF16), --full CLIP: 1.77x the fp32 steps/s.
    # Evaluation always runs in fp32.
    precision: str = "auto"

    @property
    def warmup_steps(self) -> int:
        return max(1, self.steps // 10)

    def describe(self) -> dict[str, Any]:
        g = self.image_size // self.patch_size
        return {**dataclasses.asdict(self), "warmup_steps": self.warmup_steps,
                "token_grid": f"{g}x{g}"}  # fmt: skip


# ``--full``: Lite0's last 3 blocks and MiniLM's last 2 blocks tuned as well (CLIP 16.9 T2I R@1
# vs the default's 13.7; about twice the time: docs/flickr8k/levers.md)
FULL = FlickrBudget(bottom_trainable=3, text_trainable=2)

# ``--quick``: the whole pipeline on 32 training and 16 test images at 64 px, 3 steps (the tests)
QUICK = FlickrBudget(steps=3, batch_size=8, image_size=64, embed_dim=32, image_width=32,
                     image_depth=1, image_heads=2, context_length=16, flair_k=2, train_limit=32,
                     eval_images=16, workers=0, precision="bf16")  # fmt: skip


def check_data(data: str | Path) -> Path:
    """The Flickr8k folder (``captions.jsonl`` + ``images/``), or one line saying what to pass."""
    if not str(data):
        raise ValueError("--suite flickr8k needs --data DIR (the folder holding captions.jsonl "
                         "and images/, see README 'Flickr8k')")  # fmt: skip
    root = Path(data).expanduser()
    if not (root / MANIFEST).is_file():
        raise FileNotFoundError(f"--data {data}: no {MANIFEST} there (expected the Flickr8k "
                                "folder with captions.jsonl and images/)")  # fmt: skip
    return root


def read_rows(root: Path) -> list[dict[str, Any]]:
    with open(root / MANIFEST, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def regions_reason(rows: list[dict[str, Any]]) -> str:
    """'' when the training rows carry region boxes (GRAIN can train), else why not."""
    train = [r for r in rows if r.get("split") == "train"]
    if any(r.get("regions") for r in train):
        return ""
    return ("n/a: the manifest's train rows carry no 'regions' (region descriptions with boxes, "
            "the sidecar/JSON schema GRAIN trains on); Flickr8k ships captions only")  # fmt: skip


def manifest_for(root: Path, rows: list[dict[str, Any]], b: FlickrBudget, out: Path) -> Path:
    """The manifest to train on: the original, or (``train_limit``) the first N train rows
    written under ``out`` (images still read from ``root``)."""
    if not b.train_limit:
        return root / MANIFEST
    keep = [r for r in rows if r.get("split") == "train"][: b.train_limit]
    path = out / "train_subset.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
    return path


def towers(b: FlickrBudget) -> tuple[ImageTowerConfig, TextTowerConfig]:
    image = ImageTowerConfig(name="hybrid", pretrained="package", image_size=b.image_size,
                             patch_size=b.patch_size, width=b.image_width, depth=b.image_depth,
                             heads=b.image_heads, bottom_trainable=b.bottom_trainable,
                             pool_type=b.image_pool,
                             zero_init_residual=b.zero_init_residual)  # fmt: skip
    text = TextTowerConfig(name="minilm", context_length=b.context_length,
                           trainable_blocks=b.text_trainable, lock_frozen=True)  # fmt: skip
    return image, text


def tower_description(b: FlickrBudget) -> str:
    """The image tower of the report's timing table, in words."""
    tuned = f", Lite0's last {b.bottom_trainable} blocks tuned" if b.bottom_trainable else ""
    top = ", blocks zero-initialised" if b.zero_init_residual else ""
    readout = "mean of the tokens" if b.image_pool == "avg" else "CLS"
    return (f"hybrid (Lite0 to stride {b.patch_size}{tuned} + {b.image_depth}-block transformer, "
            f"width {b.image_width}{top}; readout {readout})")  # fmt: skip


def text_description(b: FlickrBudget) -> str:
    if b.text_trainable:
        return f"MiniLM-L6 (last {b.text_trainable} blocks tuned)"
    return "MiniLM-L6 (locked; projection trains)"


def method_overrides(name: str, m: Any, b: FlickrBudget) -> dict[str, Any]:
    """Flickr8k settings of one method (on top of its ``<name>_smoke`` recipe)."""
    fields = {f.name for f in dataclasses.fields(m)}
    if name == "siglip":  # at batch 128 the released b = -10 is far from the prior -ln(B - 1)
        if "logit_bias_init" in fields:
            return {"logit_bias_init": "prior"}
        return {"init_logit_bias": -math.log(b.batch_size - 1)}
    if name == "flair":  # the pool: the 5 human captions (recipes/flair.py, flair_flickr8k)
        heads = 8 if b.embed_dim % 8 == 0 else 1
        return {"num_subcaptions": b.flair_k, "max_sentences": b.flair_max_captions,
                "caption_source": "captions", "caption_fields": [], "pool_heads": heads,
                "logit_bias_init": "prior"}  # fmt: skip
    if "views" in fields:  # DetailCLIP: views cut from the cached bottom, as in the scenes suite
        return {"views": CACHED_VIEWS}
    return {}


def test_task(root: Path, b: FlickrBudget, scoring: str = "global") -> RetrievalTaskConfig:
    return RetrievalTaskConfig(dataset="flickr8k", split="test", path=str(root), batch_size=128,
                               limit=b.eval_images, scoring=scoring,
                               context_length=b.context_length)  # fmt: skip


def run_config(name: str, b: FlickrBudget, root: Path, manifest: Path, seed: int = 0,
               **changes: Any) -> Any:  # fmt: skip
    """The RunConfig of method ``name`` in the suite; ``changes`` override method fields (the
    FLAIR ablation)."""
    from finegrain.bench.config import _base_run
    from finegrain.run_config import TrainConfig

    cfg = copy.deepcopy(_base_run(name))
    image, text = towers(b)
    m = dataclasses.replace(cfg.method, image=image, text=text, embed_dim=b.embed_dim)
    m = dataclasses.replace(m, **{**method_overrides(name, m, b), **changes})
    cfg.method, cfg.name, cfg.seed = m, f"flickr8k_{name}", seed
    cfg.data = DataConfig(source="jsonl", train=str(manifest), image_root=str(root),
                          split="train", batch_size=b.batch_size, image_size=b.image_size,
                          augment="none", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          num_workers=b.workers)  # fmt: skip
    cfg.train = TrainConfig(steps=b.steps, lr=b.lr, min_lr=0.0, warmup_steps=b.warmup_steps,
                            weight_decay=b.weight_decay, grad_clip=1.0, device=b.device,
                            checkpoint_every=0, log_every=max(1, b.steps // 5), eval_every=0,
                            progress=True,
                            precision=resolve_precision(b.precision, b.device))  # fmt: skip
    tasks = [test_task(root, b)]
    cfg.eval = EvalConfig(tasks=tasks)
    return cfg


def warm_caches(cfg: Any, method: Any, root: Path, b: FlickrBudget) -> dict[str, float]:
    """Run the frozen image bottom over every training and test image and the frozen text
    prefix over every caption once, before any method trains (the shared caches)."""
    from tqdm import tqdm

    from finegrain.data import build_train_loader
    from finegrain.data.collate import ContrastiveCollate
    from finegrain.eval.common import EvalContext, image_batches
    from finegrain.eval.datasets import load_task_data

    t0, c0 = time.perf_counter(), time.process_time()
    data = dataclasses.replace(cfg.data, num_workers=0)
    loader = build_train_loader(data, ContrastiveCollate(method.tokenize, 1), seed=cfg.seed,
                                transform=method.make_transform(data, train=False))  # fmt: skip
    captions = _train_captions(cfg.data.train)
    n = -(-len(captions) // 5 // cfg.data.batch_size)  # one epoch of batches (5 captions each)
    test = load_task_data(test_task(root, b), b.image_size)
    texts = sorted(set(captions) | set(test.texts), key=len)
    print(f"  caching the frozen bottoms once for all methods: {n * cfg.data.batch_size} training "
          f"+ {len(test.images)} test images, {len(texts)} captions", file=sys.stderr)  # fmt: skip
    bottom = method.image.conv1.bottom
    with torch.no_grad():
        for _, batch in zip(range(n), tqdm(loader, total=n, desc="image bottom", leave=False)):
            bottom(batch["image"])
        ctx = EvalContext.create(method, b.device, cfg.data, progress=True)
        for images in image_batches(ctx, test.images, 128, "image bottom (test)"):
            bottom(images)
        for s in tqdm(range(0, len(texts), 256), desc="text prefix", leave=False):
            method.text(method.tokenize(texts[s : s + 256]))
    return {"cache_s": time.perf_counter() - t0, "cache_cpu_s": time.process_time() - c0}


def _train_captions(manifest: str) -> list[str]:
    with open(manifest, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [c for r in rows if r.get("split") == "train" for c in r.get("captions", [])]


def train_method(cfg: Any, run_dir: Path) -> tuple[Any, dict[str, float]]:
    """Train one method from its config into ``run_dir``; (trained method, timing)."""
    from finegrain.data import method_loader
    from finegrain.methods.base import build_method
    from finegrain.train.trainer import Trainer

    torch.manual_seed(cfg.seed)  # as the trainer does before it builds a method
    method = build_method(cfg.method)
    if not _accepts(method, cfg):
        raise ValueError(f"method '{cfg.method.name}' cannot train on the suite's towers")
    loader = TimedLoader(method_loader(method, cfg.data, seed=cfg.seed))
    trainer = Trainer(cfg, method=method, loader=loader, output_dir=str(run_dir))
    t1, c1 = time.perf_counter(), time.process_time()
    summary = trainer.fit()
    if summary.get("status") != "completed":  # SIGTERM / SIGINT: stop the suite, not only the run
        raise SystemExit(f"{cfg.name}: training {summary.get('status')} at step "
                         f"{summary.get('step')}; the suite stops (run folder: {run_dir})")  # fmt: skip
    train_s, cpu_s = time.perf_counter() - t1, time.process_time() - c1
    return trainer.method, {"train_s": train_s, "train_cpu_s": cpu_s,
                            "data_wait_s": loader.wait_s, "steps": float(summary["step"])}  # fmt: skip


def evaluate_method(method: Any, cfg: Any, root: Path, b: FlickrBudget, run: MethodRun,
                    figures: bool = True) -> None:  # fmt: skip
    """Test retrieval, global and (where the method has it) text-conditioned; per-image values
    for the paired bootstrap; progress bars on stderr."""
    from finegrain.eval.common import EvalContext
    from finegrain.eval.datasets import load_task_data
    from finegrain.registry import EVAL_TASKS

    ctx = EvalContext.create(method, b.device, cfg.data, progress=True)
    method.eval()
    t0, c0 = time.perf_counter(), time.process_time()
    for scoring in ("global", "conditioned"):
        key = "retrieval" + ("+conditioned" if scoring == "conditioned" else "")
        if scoring == "conditioned" and not method.has_conditioned_score:
            run.results[key] = TaskResult(na=NA)
            continue
        task = test_task(root, b, scoring)
        data = load_task_data(task, b.image_size)
        t1 = time.perf_counter()
        with torch.no_grad():
            metrics, art = EVAL_TASKS.get("retrieval")(ctx, task, data)
        per = per_image_values("retrieval", data, art, metrics)
        run.results[key] = TaskResult({k: float(v) for k, v in metrics.items()}, per,
                                      seconds=time.perf_counter() - t1,
                                      protocol={"images": len(data.images),
                                                "texts": len(data.texts)})  # fmt: skip
        if figures:
            run.figures[key] = _examples(art["scores"], data)
    run.timing["eval_s"] = time.perf_counter() - t0
    run.timing["eval_cpu_s"] = time.process_time() - c0


def _examples(scores: torch.Tensor, data: Any, queries: int = 3, top: int = 5) -> dict:
    """Three caption queries spread over the test set, their top images (figures.save_retrieval)."""
    picks = list(range(0, len(data.texts), max(1, len(data.texts) // queries)))[:queries]
    ranked = [scores[:, q].argsort(descending=True, stable=True)[:top].tolist() for q in picks]
    return {"texts": [data.texts[q] for q in picks], "top": ranked,
            "gt": [data.text_to_image[q] for q in picks], "images": data.images}  # fmt: skip


@dataclass
class SuiteOptions:
    data: Path
    methods: list[str]
    budget: FlickrBudget
    out: Path
    overwrite: bool = False
    quick: bool = False
    command: str = "finegrain demo --suite flickr8k"


def _one(name: str, label: str, cfg: Any, opts: SuiteOptions, extra: dict) -> MethodRun:
    """Warm the shared caches (first call), train ``cfg`` into ``runs/<label>/seed0``, save
    its config with the test task, evaluate it."""
    from finegrain.checkpoint import CONFIG_FILE
    from finegrain.config import save_yaml
    from finegrain.methods.base import build_method

    b, run = opts.budget, MethodRun(name, 0)
    if "cache_s" not in extra:
        torch.manual_seed(0)
        extra.update(warm_caches(cfg, build_method(cfg.method), opts.data, b))
    run_dir = opts.out / "runs" / label / "seed0"
    tasks, cfg.eval = cfg.eval, EvalConfig(tasks=[])  # evaluated below, per image
    method, run.timing = train_method(cfg, run_dir)
    cfg.eval = tasks
    save_yaml(cfg, run_dir / CONFIG_FILE)  # `finegrain eval --checkpoint` runs the test
    run.towers = {"image": tower_description(b), "text": text_description(b)}
    print(f"  {label}: trained in {run.timing['train_s']:.0f} s "
          f"({run.timing['train_cpu_s']:.0f} CPU s); evaluating", file=sys.stderr)  # fmt: skip
    evaluate_method(method, cfg, opts.data, b, run)
    return run


def run_suite(opts: SuiteOptions, ablation: bool = False) -> Path:
    """Train and evaluate every method (or, with ``ablation``, FLAIR's ablation variants),
    writing the report after each; returns the report's path."""
    from finegrain.bench.flickr_report import write_report
    from finegrain.encoders.hybrid import shared_bottom_cache
    from finegrain.encoders.prefix_cache import shared_text_cache

    b, opts.data = opts.budget, check_data(opts.data)
    check_output(opts.out, opts.overwrite)
    opts.out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(opts.data)
    no_regions, manifest = regions_reason(rows), manifest_for(opts.data, rows, b, opts.out)
    jobs = [(m, m, {}) for m in opts.methods]
    if ablation:
        from finegrain.bench.flickr_report import ABLATION

        jobs = [("flair", f"flair_{key}", changes) for key, _, changes in ABLATION]
    print(f"finegrain demo --suite flickr8k: {', '.join(j[1] for j in jobs)}; {b.steps} steps "
          f"of {b.batch_size} at {b.image_size} px on {b.device}", file=sys.stderr)  # fmt: skip
    start, cpu0 = time.perf_counter(), time.process_time()
    runs: list[MethodRun] = []
    extra: dict[str, Any] = {"regions": no_regions or "present", "ablation": ablation}
    report = opts.out / "report.md"
    with shared_bottom_cache(1.0) as icache, shared_text_cache(2.0) as tcache:
        for name, label, changes in jobs:
            if name in REGION_METHODS and no_regions:
                runs.append(MethodRun(name, 0, {"retrieval": TaskResult(na=no_regions)}))
                continue
            cfg = run_config(name, b, opts.data, manifest, **changes)
            run = _one(name, label, cfg, opts, extra)
            run.method = label
            runs.append(run)
            extra.update(image_cache=icache.stats(), text_cache=tcache.stats(),
                         cpu_s=round(time.process_time() - cpu0, 2))  # fmt: skip
            report = write_report(opts, runs, time.perf_counter() - start, extra)
    wall = time.perf_counter() - start
    extra["cpu_s"] = round(time.process_time() - cpu0, 2)
    report = write_report(opts, runs, wall, extra)
    print(f"finegrain demo --suite flickr8k: done in {wall / 60:.1f} min; report: {report}",
          file=sys.stderr)  # fmt: skip
    print(report)
    return report


def options_from_args(args: Any, argv: list[str]) -> SuiteOptions:
    """Options from the parsed ``finegrain demo --suite flickr8k`` arguments."""
    from finegrain.bench.config import budget_with, methods_to_run

    base = QUICK if args.quick else FULL if getattr(args, "full", False) else FlickrBudget()
    changes = {"steps": args.steps, "image_size": args.image_size, "device": args.device}
    budget = budget_with(base, changes, getattr(args, "budget", None))
    if budget.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {budget.steps}")
    # auto decided here, so the report records what ran; a bad value fails before any work
    budget = dataclasses.replace(
        budget, precision=resolve_precision(budget.precision, budget.device)
    )
    grid = 2 * budget.patch_size
    if budget.image_size % grid:
        raise ValueError(f"--image-size {budget.image_size} is not a multiple of {grid} (an "
                         "even token grid at stride 32, for DetailCLIP's 2 x 2 blocks)")  # fmt: skip
    methods = methods_to_run(args.methods) if args.methods else list(SUITE_METHODS)
    if args.out:
        out = Path(args.out).expanduser()
    else:
        from finegrain.config import finegrain_home

        out = finegrain_home() / "demo" / ("flickr8k-" + time.strftime("%Y%m%d-%H%M%S"))
    return SuiteOptions(check_data(getattr(args, "data", "") or ""), methods, budget, out,
                        args.overwrite, args.quick, "finegrain " + " ".join(argv))  # fmt: skip
