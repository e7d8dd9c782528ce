"""Image-text retrieval (global, text-conditioned, re-ranked, long texts) as a task object: data
from ``finegrain.eval.datasets.load_retrieval_data``, recalls from ``evaluate_retrieval``,
figures from ``finegrain.eval.plots.retrieval_plots``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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

    def leading_modifiers(self, cfg: RetrievalTaskConfig) -> list[str]:
        return [
            cfg.scoring if cfg.scoring != "global" else "",
            f"k{cfg.rerank_k}" if cfg.scoring == "rerank" else "",
        ]

    def modifiers(self, cfg: RetrievalTaskConfig) -> list[str]:
        return ["stretch" if cfg.truncate == "stretch" else ""]

    def per_image_values(self, data: Any, art: dict, metrics: dict) -> dict[str, Any]:
        """R@1 of each text (with the image it describes) and of each image."""
        owner = torch.tensor(data.text_to_image)
        t2i, i2t = art["t2i_ranks"], art["i2t_ranks"]
        return {
            "image_retrieval_recall@1": ((t2i == 1).double(), owner),
            "text_retrieval_recall@1": ((i2t == 1).double(), torch.arange(len(i2t))),
        }


register_task(RetrievalTask())
