"""An evaluation task as one object (issue #28 item 3): config, data, evaluate, per-image
values, plots and name modifiers, registered once by ``register_task``.

A task file in ``finegrain/eval/tasks/`` (imported when the task registry is first read) or
a plugin's module defines one ``EvalTask`` subclass and calls ``register_task``; ``run_tasks``,
``load_task_data``, ``task_prefix``, ``save_task_plots`` and the benchmark's bootstrap
(``finegrain.bench.tasks``) ask the object. The eight built-in tasks live in ``eval/tasks/``.
A result name is ``task/dataset/variant+leading+ctx<N>+modifiers``: ``leading_modifiers`` come
before the context length only because the built-in tasks' scoring and description settings
were named there first (result names are keys reports and claims read; tests/
test_eval_task_names.py pins them). docs/ADDING_A_TASK.md is the checklist.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from finegrain.eval.config import EvalTaskConfig
from finegrain.eval.segmentation import seg_metrics
from finegrain.registry import EVAL_TASK_CONFIGS, EVAL_TASKS


class EvalTask:
    """One evaluation task. Subclasses set ``name`` and ``Config`` (an ``EvalTaskConfig``
    subclass whose ``task`` defaults to ``name``) and implement ``load`` and ``evaluate``."""

    name: str = ""
    Config: type[EvalTaskConfig] = EvalTaskConfig

    def load(self, cfg: EvalTaskConfig, image_size: int) -> Any:
        """The task's data for ``cfg`` at the model's input size (one-line errors)."""
        raise NotImplementedError

    def evaluate(self, ctx: Any, cfg: EvalTaskConfig, data: Any) -> tuple[dict[str, float], dict]:
        """(metrics, artefacts for plots and per-image values) of ``ctx.method`` on ``data``."""
        raise NotImplementedError

    def modifiers(self, cfg: EvalTaskConfig) -> list[str]:
        """Non-default settings that join the result name's variant after the context length
        (``task_prefix``); empty strings are dropped."""
        return []

    def leading_modifiers(self, cfg: EvalTaskConfig) -> list[str]:
        """Non-default settings that join the variant before the context length (the built-in
        tasks' scoring and descriptions, kept where their names had them); a new task uses
        ``modifiers``."""
        return []

    def per_image_values(self, data: Any, art: dict, metrics: dict) -> dict[str, Any]:
        """Per-image values of each metric for the benchmark's bootstrap over evaluation images
        (``finegrain.bench.tasks``): ``{metric: (values (M,), image index of each (M,))}`` for
        means, ``{"confusions": (N, C, C)}`` for confusion-matrix metrics (mIoU). The default
        reads ``art["per_image"] = {metric: (N,)}``, ``art["per_item"] = {metric: (values,
        image of each)}`` and ``art["confusions"]``; without them a claim has no interval."""
        return generic_per_image_values(art, metrics)

    def plots(self, ctx: Any, data: Any, art: dict, out_dir: Path, num: int) -> list[Path]:
        """The task's figures under ``out_dir`` (at most ``num`` examples)."""
        return []

    def __call__(self, ctx: Any, cfg: EvalTaskConfig, data: Any) -> tuple[dict, dict]:
        return self.evaluate(ctx, cfg, data)


def generic_per_image_values(art: dict, metrics: dict) -> dict[str, Any]:
    """``EvalTask.per_image_values`` from the artefacts' ``confusions``, ``per_image`` and
    ``per_item`` (also for tasks registered as plain functions)."""
    out: dict[str, Any] = {}
    if "confusions" in art:  # mIoU with or without background: whichever the task reported
        conf = torch.as_tensor(art["confusions"])
        out["confusions"] = conf
        no_bg = seg_metrics(conf.sum(0), ignore_background=True)["miou"]
        out["ignore_background"] = abs(no_bg - metrics.get("miou", no_bg)) < 1e-9
    for k, v in art.get("per_image", {}).items():  # {metric: (N,) one value per image}
        v = torch.as_tensor(v).double()
        out[k] = (v, torch.arange(len(v)))
    for k, (v, owner) in art.get("per_item", {}).items():  # {metric: (values, image of each)}
        out[k] = (torch.as_tensor(v).double(), torch.as_tensor(owner).long())
    return out


def register_task(task: EvalTask) -> EvalTask:
    """Register ``task`` under ``task.name``: its config class and the object itself."""
    default = {f.name: f.default for f in dataclasses.fields(task.Config)}["task"]
    if not task.name or default != task.name or task.Config is EvalTaskConfig:
        raise ValueError(f"task {type(task).__name__}: set name and a Config subclass whose "
                         f"task defaults to it (got '{task.name}', '{default}')")  # fmt: skip
    EVAL_TASK_CONFIGS.add(task.name, task.Config)
    EVAL_TASKS.add(task.name, task)
    return task


def task_object(name: str) -> EvalTask | None:
    """The registered ``EvalTask`` of kind ``name``, None for the older function layout."""
    try:
        found = EVAL_TASKS.get(name)
    except ValueError:  # unknown: the caller names the valid choices
        return None
    return found if isinstance(found, EvalTask) else None
