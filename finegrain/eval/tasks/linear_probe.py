"""Linear-probe segmentation as a task object: two splits (train the head, measure) from
``finegrain.eval.datasets.load_probe_data``, the probe from ``evaluate_linear_probe``."""

from __future__ import annotations

from typing import Any

from finegrain.eval.config import LinearProbeTaskConfig
from finegrain.eval.datasets import load_probe_data
from finegrain.eval.linear_probe import evaluate_linear_probe
from finegrain.eval.task import EvalTask, register_task


class LinearProbeTask(EvalTask):
    name, Config = "linear_probe", LinearProbeTaskConfig

    def load(self, cfg: LinearProbeTaskConfig, image_size: int) -> Any:
        return load_probe_data(cfg, image_size)

    def evaluate(self, ctx: Any, cfg: LinearProbeTaskConfig, data: Any) -> tuple[dict, dict]:
        return evaluate_linear_probe(ctx, cfg, data)


register_task(LinearProbeTask())
