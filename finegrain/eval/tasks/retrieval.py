"""Image-text retrieval (global, text-conditioned, re-ranked, long texts) as a task object: data
from ``finegrain.eval.datasets.load_retrieval_data``, recalls from ``evaluate_retrieval``,
figures from ``finegrain.eval.plots.retrieval_plots``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finegrain.eval.config import RetrievalTaskConfig
from finegrain.eval.datasets import load_retrieval_data
from finegrain.eval.retrieval import evaluate_retrieval
from finegrain.eval.task import EvalTask, register_task


class RetrievalTask(EvalTask):
    name, Config = "retrieval", RetrievalTaskConfig

    def load(self, cfg: RetrievalTaskConfig, image_size: int) -> Any:
        return load_retrieval_data(cfg, image_size)

    def evaluate(self, ctx: Any, cfg: RetrievalTaskConfig, data: Any) -> tuple[dict, dict]:
        return evaluate_retrieval(ctx, cfg, data)

    def plots(self, ctx: Any, data: Any, art: dict, out_dir: Path, num: int) -> list[Path]:
        from finegrain.eval.plots import retrieval_plots  # matplotlib: only for plots

        return retrieval_plots(ctx, data, art, out_dir, num)


register_task(RetrievalTask())
