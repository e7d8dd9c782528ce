"""Compositional image-text matching (SugarCrepe, Winoground) as a task object: data from
``finegrain.eval.compositional_data.load_compositional_data``, scores from
``evaluate_compositional``."""

from __future__ import annotations

from typing import Any

import torch

from finegrain.eval.compositional import evaluate_compositional
from finegrain.eval.compositional_data import load_compositional_data
from finegrain.eval.config import CompositionalTaskConfig
from finegrain.eval.task import EvalTask, register_task


class CompositionalTask(EvalTask):
    name, Config = "compositional", CompositionalTaskConfig

    def load(self, cfg: CompositionalTaskConfig, image_size: int) -> Any:
        return load_compositional_data(cfg, image_size)

    def evaluate(self, ctx: Any, cfg: CompositionalTaskConfig, data: Any) -> tuple[dict, dict]:
        return evaluate_compositional(ctx, cfg, data)

    def leading_modifiers(self, cfg: CompositionalTaskConfig) -> list[str]:
        return [cfg.scoring if cfg.scoring != "global" else ""]

    def per_image_values(self, data: Any, art: dict, metrics: dict) -> dict[str, Any]:
        """Each caption-vs-negative pair right (caption strictly above) or not, per kind
        (``acc_<kind>``), with its image; none when items were dropped (scores not aligned)."""
        items = art["items"]
        flat = art["pair_scores"]
        n_item = sum(1 + len(it.negatives) for it in items)
        if n_item + 4 * len(art.get("groups", [])) != len(flat):
            return {}
        out: dict[str, list] = {}
        for it, s in zip(items, flat[:n_item].split([1 + len(it.negatives) for it in items])):
            for kind, neg in zip(it.kinds, s[1:]):
                vals, owner = out.setdefault(f"acc_{kind}", ([], []))
                vals.append(float(s[0] > neg))
                owner.append(it.image)
        return {k: (torch.tensor(v, dtype=torch.float64), torch.tensor(o))
                for k, (v, o) in out.items()}  # fmt: skip


register_task(CompositionalTask())
