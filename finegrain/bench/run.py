"""``finegrain demo``: train every registered method under one budget on the built-in scenes,
evaluate each on every task, check the papers' claims, write report.md, results.json and PNGs.

    finegrain demo                       # all methods, default budget (<= 10 min, 2 CPU cores)
    finegrain demo --quick               # a 1-minute smoke of the same pipeline (the tests)
    finegrain demo --methods clip,flair --steps 2000 --image-size 128 --device cuda --seeds 3

On CPU the method runs (method x seed) go to ``--jobs`` forked worker processes (default: one
per CPU core, at most one per run), each with one torch thread, so a run's numbers never depend
on the core count or on ``--jobs``: the parent renders the training scenes and fills the shared
bottom cache first, and every worker inherits both.
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from finegrain.bench.config import (
    FULL,
    FULL_SEEDS,
    QUICK,
    Budget,
    budget_with,
    check_budget,
    methods_to_run,
    resolve_precision,
    run_config,
)
from finegrain.bench.tasks import TaskResult, images_for, run_boxes, run_suite_task, task_specs
from finegrain.data.synthetic_sets import memo_scenes
from finegrain.encoders.hybrid import active_bottom_cache, shared_bottom_cache

# CPU seconds (one thread) per training step of 64 scenes at 128 px on the hybrid tower with
# its bottom cached, measured 2026-12-07 on the quiet 2-core development machine (AMD EPYC) in
# the default run (300 steps, 2 jobs of one thread). DetailCLIP cuts its two views from the
# cached bottom (``views="tokens"``, bench.config.CACHED_VIEWS). Unknown methods use the slowest.
REF_STEP_CPU_S = {"clip": 0.28, "siglip": 0.27, "flair": 0.41, "grain": 0.35, "clippy": 0.28,
                  "detailclip": 0.77}  # fmt: skip
SCENE_CPU_S = 0.006  # render one 128 px scene + run the frozen bottom on it (once per process)
# per evaluation image, every task but the probe and the region-level ones, one method (bottom
# cached; same run): evaluation took 12-14 CPU s per method at 256 / 128 / 64 images
EVAL_CPU_S = 0.03
PROBE_CPU_S = 0.1  # per linear-probe training scene (30 epochs of its 1 x 1 conv head)
EVAL_SPLITS = 9  # distinct evaluation scene sets (rendered and cached once per worker)
REGION_CPU_S = 0.02  # the region-level tasks (box crops, RoIAlign, ...) per image, one method
REGION_SPLITS = 2.6  # scene sets' worth of one-off rendering + bottom
REPORT_FILES = ("report.md", "results.json")


@dataclass
class Options:
    methods: list[str]
    budget: Budget
    seeds: int = 1
    out: Path = Path("demo")
    overwrite: bool = False
    quick: bool = False
    command: str = "finegrain demo"
    workers: int = 1
    warmed: set[int] = field(default_factory=set)  # scene seeds whose training scenes are cached
    jobs: int = 1  # method runs at once (forked workers, one torch thread each on CPU)
    seed_start: int = 0  # the run's seeds: seed_start .. seed_start + seeds - 1

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seed_start, self.seed_start + self.seeds))


@dataclass
class MethodRun:
    """One trained model (method x seed): timing, results, and figure material (seed 0)."""

    method: str
    seed: int
    results: dict[str, TaskResult] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    towers: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)


class TimedLoader:
    """Wraps the training loader and adds up the time the step waits for each batch."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.wait_s, self.batches = loader, 0.0, 0

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            batch = next(it)
            self.wait_s += time.perf_counter() - t0
            self.batches += 1
            yield batch

    def __getattr__(self, name: str) -> Any:  # state_dict, stats, ...
        return getattr(self.loader, name)


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse (one line) a folder that holds another report, unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    found = [f for f in REPORT_FILES if (out / f).exists()]
    if found and not overwrite:
        raise ValueError(f"--out {out} already holds a report ({found[0]}); pass --overwrite "
                         "to replace it or choose another folder")  # fmt: skip


def _step_cpu_s(name: str) -> float:
    return REF_STEP_CPU_S.get(name, max(REF_STEP_CPU_S.values()))


def estimate_s(methods: list[str], b: Budget, seeds: int, jobs: int = 2) -> float:
    """Rough wall seconds on 2 quiet CPU cores from measured one-thread CPU times: the training
    scenes and their bottom once (parent), then the runs on ``jobs`` workers (longest first;
    each worker renders and caches the evaluation scenes once)."""
    scale = (b.batch_size / 64) * (b.image_size / 128) ** 2
    pixels = (b.image_size / 128) ** 2
    regions = min(b.region_images, b.eval_images)
    warm = len({b.scene_seed(s) for s in range(seeds)}) * b.train_scenes * SCENE_CPU_S * pixels
    eval_scenes = (EVAL_SPLITS * b.eval_images + REGION_SPLITS * regions) * SCENE_CPU_S * pixels
    per_eval = (b.eval_images * EVAL_CPU_S + regions * REGION_CPU_S
                + b.probe_train * PROBE_CPU_S) * pixels + 4  # + build / save  # fmt: skip
    costs = sorted((_step_cpu_s(m) * b.steps * scale + per_eval for m in methods for _ in
                    range(seeds)), reverse=True)  # fmt: skip
    lanes = [0.0] * max(1, min(jobs, len(costs)))
    for c in costs:  # longest processing time first, each to the least loaded worker
        lanes[lanes.index(min(lanes))] += c
    cores = min(jobs, 2)  # the estimate is for 2 cores
    return warm + eval_scenes + max(lanes) * len(lanes) / cores


def _accepts(method: Any, cfg: Any) -> bool:
    """Whether the method trains with these towers: one no-grad step on a copy (towers that
    cannot give token subsets, masks or attention raise a ValueError)."""
    from finegrain.data import method_loader

    data = dataclasses.replace(cfg.data, batch_size=2, num_workers=0)
    probe = copy.deepcopy(method).train()
    try:
        loader = method_loader(probe, data, seed=0)
        batch = next(iter(loader))
        with torch.no_grad():
            probe(batch)
    except (ValueError, NotImplementedError):
        return False
    return True


def build(name: str, b: Budget, seed: int) -> tuple[Any, Any]:
    """(RunConfig, method) with the shared towers, or the method's own image tower when it
    cannot train on the shared one."""
    from finegrain.methods.base import build_method

    for shared in (True, False):
        cfg = run_config(name, b, seed, shared_image=shared)
        torch.manual_seed(cfg.seed)  # as the trainer does before it builds a method
        try:
            method = build_method(cfg.method)
        except ValueError:  # refuses the shared tower at construction (e.g. no patch tokens)
            if shared:
                continue
            raise
        if not shared or _accepts(method, cfg):
            return cfg, method
    raise AssertionError("unreachable")


def warm_bottom_cache(cfg: Any, method: Any) -> dict[str, float]:
    """Run the hybrid tower's frozen bottom once over one epoch of the training scenes (the
    batches every method's first epoch draws, default transform), filling the shared cache
    before any method trains, so no method's training time carries the cache build."""
    from finegrain.data import build_train_loader
    from finegrain.data.collate import ContrastiveCollate
    from finegrain.data.transforms import train_transform
    from finegrain.encoders.hybrid import HybridTower

    tower = next((m for m in method.modules() if isinstance(m, HybridTower)), None)
    if tower is None:
        return {}
    t0, c0 = time.perf_counter(), time.process_time()
    data = dataclasses.replace(cfg.data, num_workers=0)  # renders in this process: the scene
    loader = build_train_loader(data, ContrastiveCollate(method.tokenize, 1),  # memo fills
                                seed=cfg.seed, transform=train_transform(data))  # fmt: skip
    n = -(-cfg.data.synthetic.num_samples // cfg.data.batch_size)
    bottom = tower.conv1.bottom
    print(f"  caching the image tower's frozen bottom on {cfg.data.synthetic.num_samples} "
          f"training scenes (scene seed {cfg.data.synthetic.seed}), once for all methods", file=sys.stderr)  # fmt: skip
    for _, batch in zip(range(n), tqdm(loader, total=n, desc="bottom cache", leave=False)):
        bottom(batch["image"].to(cfg.train.device))
    return {"cache_s": time.perf_counter() - t0, "cache_cpu_s": time.process_time() - c0}


def train_one(name: str, opts: Options, seed: int, run_dir: Path) -> tuple[Any, Any, MethodRun]:
    from finegrain.data import method_loader
    from finegrain.train.trainer import Trainer

    t0 = time.perf_counter()
    cfg, method = build(name, opts.budget, seed)
    cfg.data.num_workers = opts.workers if opts.jobs == 1 else 0  # a worker renders nothing new
    if opts.jobs > 1:  # workers' bars and logs would interleave: the parent counts the runs
        cfg.train.progress, cfg.train.log_every = False, cfg.train.steps
    scenes = cfg.data.synthetic.seed
    warm = warm_bottom_cache(cfg, method) if scenes not in opts.warmed else {}
    if warm:
        opts.warmed.add(scenes)
        t0 += warm["cache_s"]
    loader = TimedLoader(method_loader(method, cfg.data, seed=cfg.seed))
    trainer = Trainer(cfg, method=method, loader=loader, output_dir=str(run_dir))
    t1, c1 = time.perf_counter(), time.process_time()
    summary = trainer.fit()
    train_s, cpu_s = time.perf_counter() - t1, time.process_time() - c1
    n = cfg.train.steps * cfg.data.batch_size
    run = MethodRun(name, seed)
    run.towers = {"image": _tower_name(cfg.method.image), "text": cfg.method.text.name}
    run.timing = {**warm, "build_s": t1 - t0, "train_s": train_s, "samples_per_s": n / train_s,
                  "train_cpu_s": cpu_s, "data_wait_s": loader.wait_s, "data_share": loader.wait_s / train_s,
                  "steps": float(summary["step"])}  # fmt: skip
    return cfg, trainer.method, run


def _tower_name(image: Any) -> str:
    if image.name != "hybrid":
        return image.name
    return (f"hybrid (EfficientNet-Lite0 to stride {image.patch_size}, frozen + {image.depth}-block "
            f"transformer, width {image.width})")  # fmt: skip


def evaluate(method: Any, cfg: Any, opts: Options, run: MethodRun, figures: bool) -> None:
    """Every task on the trained ``method``; fills ``run.results`` (and figure material)."""
    from finegrain.bench.figures import collect
    from finegrain.eval.common import EvalContext

    ctx = EvalContext.create(method, opts.budget.device, cfg.data, progress=False)
    method.eval()
    t0, c0 = time.perf_counter(), time.process_time()
    for spec in task_specs():
        if spec.key == "boxes":
            res, art = run_boxes(ctx, opts.budget.eval_images)
            data = None
        else:
            res, data, art = run_suite_task(ctx, spec, images_for(spec, opts.budget),
                                            opts.budget.probe_train)  # fmt: skip
        run.results[spec.key] = res
        if figures and not res.na:
            collect(ctx, spec.key, data, art, run.figures)
    run.timing["eval_s"] = time.perf_counter() - t0
    run.timing["eval_cpu_s"] = time.process_time() - c0


def _one_run(name: str, seed: int, opts: Options) -> MethodRun:
    """Train and evaluate one method x seed."""
    run_dir = opts.out / "runs" / name / f"seed{seed}"
    cfg, method, run = train_one(name, opts, seed, run_dir)
    if opts.jobs == 1:
        print(f"  {name} (seed {seed}): trained in {run.timing['train_s']:.0f} s "
              f"({run.timing['train_cpu_s']:.0f} CPU s); evaluating", file=sys.stderr)  # fmt: skip
    evaluate(method, cfg, opts, run, figures=seed == opts.seed_start)
    save_run(run, run_dir)
    return run


RUN_RESULTS = "results.pt"  # per run (method x seed): every task's metrics and per-image values


def save_run(run: MethodRun, run_dir: Path) -> None:
    """The run's results with their per-image values (what the paired bootstrap reads), so
    that runs of other seeds, made later or elsewhere, can be merged into one report
    (``finegrain demo --merge``); plain tensors, numbers and strings: loads with
    ``weights_only=True``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {"method": run.method, "seed": run.seed, "timing": run.timing, "towers": run.towers,
             "results": {k: dataclasses.asdict(r) for k, r in run.results.items()}}  # fmt: skip
    torch.save(state, run_dir / RUN_RESULTS)


def load_run(path: Path) -> MethodRun:
    """A run saved by ``save_run`` (untrusted input: ``weights_only=True``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    run = MethodRun(state["method"], int(state["seed"]), timing=state["timing"],
                    towers=state["towers"])  # fmt: skip
    run.results = {k: TaskResult(**r) for k, r in state["results"].items()}
    return run


def _worker_run(name: str, seed: int, opts: Options) -> tuple[MethodRun, int, dict[str, float]]:
    """``_one_run`` in a forked worker: the run, the worker's pid and its bottom-cache
    statistics so far (the parent adds up what each worker cached)."""
    if opts.budget.device == "cpu":
        torch.set_num_threads(1)
    run = _one_run(name, seed, opts)
    cache = active_bottom_cache()
    return run, os.getpid(), (cache.stats() if cache is not None else {})


def fork_available(device: str = "cpu") -> bool:
    """Parallel runs fork (workers inherit the parent's scene memo and bottom cache): on CPU
    (CUDA cannot be forked) and on Linux only (elsewhere forking a process that holds threads
    is not safe); otherwise runs go one by one."""
    return (device == "cpu" and sys.platform.startswith("linux")
            and "fork" in multiprocessing.get_all_start_methods())  # fmt: skip


def default_jobs(device: str, runs: int) -> int:
    """One worker per usable CPU core, at most one per run; 1 on a GPU or without fork."""
    if not fork_available(device):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, runs))


def _runs_in_parallel(opts: Options, order: list[tuple[str, int]]
                      ) -> list[tuple[MethodRun, int, dict[str, float]]]:  # fmt: skip
    """The runs on ``opts.jobs`` forked workers, longest first; the parent counts them."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    done = []
    with ProcessPoolExecutor(opts.jobs, mp_context=multiprocessing.get_context("fork")) as ex:
        futures = [ex.submit(_worker_run, name, seed, opts) for name, seed in order]
        bar = tqdm(total=len(futures), desc=f"method runs ({opts.jobs} jobs)", file=sys.stderr)
        try:
            for f in as_completed(futures):
                run, pid, stats = f.result()
                t = run.timing
                bar.write(f"  {run.method} (seed {run.seed}): trained in {t['train_s']:.0f} s "
                          f"({t['train_cpu_s']:.0f} CPU s), evaluated in {t['eval_s']:.0f} s",
                          file=sys.stderr)  # fmt: skip
                bar.update()
                done.append((run, pid, stats))
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            bar.close()
    return done


def _cache_stats(parent: dict[str, float], workers: dict[int, dict[str, float]]
                 ) -> dict[str, float]:  # fmt: skip
    """The parent's bottom cache plus what each worker added to its inherited copy."""
    out = dict(parent)
    for w in workers.values():
        for k in ("images", "mib", "hits", "misses"):
            out[k] = out.get(k, 0) + w.get(k, 0) - parent.get(k, 0)
    return out


def run_benchmark(opts: Options) -> Path:
    """Train and evaluate everything, then write the report; returns the report's path."""
    from finegrain.bench.report import write_outputs

    check_budget(opts.budget)
    check_output(opts.out, opts.overwrite)
    if opts.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {opts.jobs}")
    if opts.jobs > 1 and not fork_available(opts.budget.device):
        opts = dataclasses.replace(opts, jobs=1)
    if opts.overwrite and (opts.out / "runs").is_dir():
        shutil.rmtree(opts.out / "runs")  # this benchmark's own previous training runs
    opts.out.mkdir(parents=True, exist_ok=True)
    est = estimate_s(opts.methods, opts.budget, opts.seeds, opts.jobs)
    b = opts.budget
    print(f"finegrain demo: {len(opts.methods)} methods ({', '.join(opts.methods)}) x "
          f"{opts.seeds} seed(s), {b.steps} steps of {b.batch_size} at {b.image_size} px on "
          f"{b.device}, {opts.jobs} job(s); estimated {est / 60:.1f} min on 2 CPU cores",
          file=sys.stderr)  # fmt: skip
    start, cpu0 = time.perf_counter(), time.process_time()
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    threads = torch.get_num_threads()
    # longest first (a long run started last would leave the other workers idle at the end)
    order = sorted(((n, s) for s in opts.seed_list for n in opts.methods),
                   key=lambda r: -_step_cpu_s(r[0]) if opts.jobs > 1 else 0)  # fmt: skip
    try:
        if b.device == "cpu":
            torch.set_num_threads(1)  # every run on one thread: numbers independent of --jobs
        with shared_bottom_cache() as cache, memo_scenes():
            parent_cache_s = 0.0
            if opts.jobs > 1:  # the workers inherit the scenes and the cache
                for seed in sorted({b.scene_seed(s) for s in opts.seed_list}):
                    cfg, method = build(opts.methods[0], b, seed)
                    parent_cache_s += warm_bottom_cache(cfg, method).get("cache_s", 0.0)
                    opts.warmed.add(cfg.data.synthetic.seed)
                parent_stats = cache.stats()
                done = _runs_in_parallel(opts, order)
                runs = [r for r, _, _ in done]
                stats = _cache_stats(parent_stats, {pid: st for _, pid, st in done})
            else:
                runs = [_one_run(n, s, opts) for n, s in order]
                stats = cache.stats()
    finally:
        torch.set_num_threads(threads)
    runs.sort(key=lambda r: run_rank(r, opts.methods))
    wall = time.perf_counter() - start
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (time.process_time() - cpu0 + child.ru_utime + child.ru_stime - child0.ru_utime
           - child0.ru_stime)  # fmt: skip
    extra = {"cpu_s": round(cpu, 2), "bottom_cache": stats, "jobs": opts.jobs,
             "parent_cache_s": round(parent_cache_s, 2)}  # fmt: skip
    report = write_outputs(opts, runs, wall, extra)
    print(f"finegrain demo: done in {wall / 60:.1f} min; report: {report}", file=sys.stderr)
    print(report)
    return report


def run_rank(run: MethodRun, methods: list[str]) -> tuple[int, int]:
    """Canonical report order: by seed, then the methods' order (never the finish order)."""
    return run.seed, methods.index(run.method)


def options_from_args(args: Any, argv: list[str]) -> Options:
    """Options from the parsed ``finegrain demo`` arguments (see ``finegrain.cli``)."""
    base = QUICK if args.quick else FULL if getattr(args, "full", False) else Budget()
    changes = {"steps": args.steps, "image_size": args.image_size, "device": args.device}
    budget = budget_with(base, changes, getattr(args, "budget", None))
    # auto decided here, so the report records what ran; a bad value fails before any work
    budget = dataclasses.replace(
        budget, precision=resolve_precision(budget.precision, budget.device)
    )
    seeds = (
        args.seeds if args.seeds is not None else FULL_SEEDS if getattr(args, "full", False) else 1
    )
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if args.out:
        out = Path(args.out).expanduser()
    else:
        from finegrain.config import finegrain_home

        out = finegrain_home() / "demo" / time.strftime("%Y%m%d-%H%M%S")
    methods = methods_to_run(args.methods)
    jobs = getattr(args, "jobs", None)
    if jobs is None:
        jobs = default_jobs(budget.device, len(methods) * seeds)
    start = getattr(args, "seed_start", None) or 0
    if start < 0:
        raise ValueError(f"--seed-start must be >= 0, got {start}")
    return Options(methods, budget, seeds, out, args.overwrite, args.quick,
                   "finegrain " + " ".join(argv), jobs=jobs, seed_start=start)  # fmt: skip
