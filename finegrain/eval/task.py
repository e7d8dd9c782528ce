"""An evaluation task as one object (issue #28 item 3): config, data, evaluate, per-image
values, plots and name modifiers, registered once by ``register_task``.

A task file in ``finegrain/eval/tasks/`` (imported when the task registry is first read) or
a plugin's module defines one ``EvalTask`` subclass and calls ``register_task``; ``run_tasks``,
``load_task_data``, ``task_prefix`` and ``save_task_plots`` ask the object. The eight built-in
tasks live in ``eval/tasks/``; their name modifiers still sit in ``task_prefix`` in one shared
order (moving them would change result names that reports and claims key on).
docs/ADDING_A_TASK.md is the checklist.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from finegrain.eval.config import EvalTaskConfig
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
        """Non-default settings that join the result name's variant (``task_prefix``)."""
        return []

    def per_image(self, data: Any, art: dict, metrics: dict) -> dict[str, Any]:
        """Per-image values of each metric (the benchmark's bootstrap); {} when none."""
        return {}

    def plots(self, ctx: Any, data: Any, art: dict, out_dir: Path, num: int) -> list[Path]:
        """The task's figures under ``out_dir`` (at most ``num`` examples)."""
        return []

    def __call__(self, ctx: Any, cfg: EvalTaskConfig, data: Any) -> tuple[dict, dict]:
        return self.evaluate(ctx, cfg, data)


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
