"""Evaluation: zero-shot classification, retrieval (global, text-conditioned, re-ranked,
fine-grained, long), zero-shot segmentation, reports.

``run_tasks(method, tasks)`` runs a list of ``EvalTaskConfig`` and returns flat metrics
``<task>/<dataset>[/<variant>]/<metric>``; the trainer calls it at its eval cadence and
``finegrain eval`` (``finegrain.eval_cli``) from the command line.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from pathlib import Path

import torch
import yaml

from finegrain.config import from_dict, validate_config
from finegrain.data.config import DataConfig
from finegrain.errors import one_line
from finegrain.eval.common import EvalContext
from finegrain.eval.config import (
    EvalConfig,
    EvalTaskConfig,
    GroupingTaskConfig,
    LinearProbeTaskConfig,
    RetrievalTaskConfig,
    SegmentationTaskConfig,
    ZeroShotTaskConfig,
    task_config_class,
)
from finegrain.eval.datasets import load_task_data
from finegrain.eval.protocol import protocol_card
from finegrain.eval.report import markdown_table, write_report
from finegrain.eval.task import EvalTask, register_task, task_object
from finegrain.methods.base import Method
from finegrain.registry import EVAL_TASKS


def import_task_modules() -> list[str]:
    """Import every module of ``finegrain/eval/tasks/`` (each registers its task object)."""
    package = importlib.import_module("finegrain.eval.tasks")
    names = [f"finegrain.eval.tasks.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    for name in names:
        importlib.import_module(name)
    return names


import_task_modules()

__all__ = [
    "EvalConfig",
    "EvalTask",
    "EvalTaskConfig",
    "GroupingTaskConfig",
    "LinearProbeTaskConfig",
    "RetrievalTaskConfig",
    "SegmentationTaskConfig",
    "ZeroShotTaskConfig",
    "markdown_table",
    "register_task",
    "run_tasks",
    "task_prefix",
    "write_report",
]


# what a task's data or files can raise (one-line messages); anything else is a bug and stops
TASK_ERRORS = (ValueError, FileNotFoundError, OSError)


def task_prefix(cfg: EvalTaskConfig) -> str:
    """``task/dataset[/variant]``: the variant joins with '+' the task object's
    ``leading_modifiers``, the context length and its ``modifiers`` (non-default scoring,
    descriptions, fusion, inference size...), so several settings of one dataset never
    collide. A task registered as a plain function has the common ones only."""
    if cfg.name:
        return cfg.name
    task = task_object(cfg.task)
    mods = [
        cfg.variant,
        *(task.leading_modifiers(cfg) if task else []),
        f"ctx{cfg.context_length}" if cfg.context_length else "",
        *(task.modifiers(cfg) if task else []),
    ]
    variant = "+".join(m for m in mods if m)
    return "/".join(p for p in (cfg.task, cfg.dataset, variant) if p)


def check_task(cfg: EvalTaskConfig, where: str = "task") -> None:
    """A task config of the class its kind registered, with valid choices (one-line error)."""
    cls = task_config_class(cfg.task)
    if not isinstance(cfg, cls):
        raise ValueError(
            f"{where}: task '{cfg.task}' needs a {cls.__name__}, got {type(cfg).__name__}"
        )
    validate_config(cfg, where)


def _run_data_config(out_dir: Path) -> DataConfig | None:
    """The data section of the run whose ``config.yaml`` sits up to 3 levels above
    ``out_dir`` (the trainer evaluates into ``<run>/eval/step_N``), so the run's own
    normalisation is used when the caller passes no ``data_cfg``; None if there is none."""
    for d in [out_dir, *out_dir.parents][:4]:
        if (d / "config.yaml").is_file():
            try:
                raw = yaml.safe_load((d / "config.yaml").read_text()) or {}
                return from_dict(DataConfig, raw.get("data") or {}, "data")
            except (ValueError, yaml.YAMLError, AttributeError):
                return None
    return None


def run_tasks(
    method: Method,
    tasks: list[EvalTaskConfig],
    *,
    device: str | torch.device = "cpu",
    out_dir: str | Path | None = None,
    progress: bool = True,
    data_cfg: DataConfig | None = None,
    protocols: dict[str, dict] | None = None,
    run_info: dict | None = None,
    failed: dict[str, str] | None = None,
) -> dict[str, float]:
    """Run every task; plots (and nothing else) are written only when ``out_dir`` is given.

    ``data_cfg`` supplies the normalisation mean/std of the run; without it, the
    ``config.yaml`` of a run directory holding ``out_dir`` is used, else CLIP's mean/std.
    ``protocols``, when given, receives the protocol card of each task under its result prefix
    (``finegrain.eval.protocol``); ``run_info`` (checkpoint, step, seed) joins every card.
    ``failed``, when given, receives ``{prefix: one-line reason}`` for each task that fails on
    its data or files (``TASK_ERRORS``: nothing to score, a missing file...) and the other tasks
    still run (``finegrain eval``); without it such an error propagates (the trainer).
    Restores the method's train/eval mode afterwards.
    """
    for i, cfg in enumerate(tasks):
        check_task(cfg, f"tasks[{i}]")
    if data_cfg is None and out_dir is not None:
        data_cfg = _run_data_config(Path(out_dir))
    ctx = EvalContext.create(method, device, data_cfg, progress)
    was_training = method.training
    method.eval()
    results: dict[str, float] = {}
    try:
        for cfg in tasks:
            evaluate = EVAL_TASKS.get(cfg.task)
            prefix = task_prefix(cfg)
            t0 = time.perf_counter()
            try:
                data = load_task_data(cfg, ctx.image_size)
                with torch.no_grad():
                    metrics, art = evaluate(ctx, cfg, data)
            except TASK_ERRORS as e:
                if failed is None:
                    raise
                failed[prefix] = one_line(e)
                continue
            dup = [k for k in metrics if f"{prefix}/{k}" in results]
            assert not dup, f"two tasks share the result prefix '{prefix}'; set name= on one"
            results.update({f"{prefix}/{k}": float(v) for k, v in metrics.items()})
            results[f"{prefix}/seconds"] = time.perf_counter() - t0
            if protocols is not None:
                protocols[prefix] = protocol_card(ctx, cfg, data, art, run_info)
            if out_dir is not None:
                from finegrain.eval.plots import save_task_plots  # matplotlib: only for plots

                save_task_plots(ctx, cfg.task, data, art, Path(out_dir) / prefix, cfg.num_examples)
    finally:
        method.train(was_training)
    return results
