"""Per-image values for the benchmark's bootstrap come from each task's object
(``EvalTask.per_image_values``, issue #28 item 3): zero-shot and retrieval values against a naive
per-item loop on a real evaluation, whose mean is the task's metric; the benchmark asks the task
object; a task registered as a plain function gets the generic reading of its artefacts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from finegrain.bench.tasks import per_image_values
from finegrain.eval.common import EvalContext
from finegrain.eval.config import EvalTaskConfig, task_kind
from finegrain.eval.datasets import load_task_data
from finegrain.eval.task import EvalTask, task_object
from finegrain.methods.base import build_method
from finegrain.recipes.base import get_recipe
from finegrain.registry import EVAL_TASKS


@pytest.fixture(scope="module")
def ctx() -> EvalContext:
    cfg = get_recipe("clip_smoke")
    torch.manual_seed(0)
    method = build_method(cfg.method).eval()
    return EvalContext.create(method, "cpu", cfg.data, progress=False)


def _run(ctx: EvalContext, **fields: Any) -> tuple[Any, dict, dict]:
    cfg = EvalTaskConfig(num_samples=12, **fields)
    data = load_task_data(cfg, ctx.image_size)
    with torch.no_grad():
        metrics, art = EVAL_TASKS.get(cfg.task)(ctx, cfg, data)
    return data, art, metrics


def test_zeroshot_values_are_each_image_right_or_not(ctx: EvalContext) -> None:
    data, art, metrics = _run(ctx, task="zeroshot", variant="shape")
    values, owner = per_image_values("zeroshot", data, art, metrics)["acc1"]
    logits = art["logits"].double()
    naive = [float(max(range(logits.shape[1]), key=lambda c: logits[i, c]) == art["labels"][i])
             for i in range(len(logits))]  # fmt: skip
    assert values.tolist() == naive and owner.tolist() == list(range(len(naive)))
    assert values.mean().item() == pytest.approx(metrics["acc1"], abs=1e-6)


def test_retrieval_values_are_each_text_and_image_at_rank_one(ctx: EvalContext) -> None:
    data, art, metrics = _run(ctx, task="retrieval", variant="sentences")
    per = per_image_values("retrieval", data, art, metrics)
    t2i, owner = per["image_retrieval_recall@1"]
    assert owner.tolist() == list(data.text_to_image) and len(set(owner.tolist())) < len(owner)
    assert t2i.tolist() == [float(r == 1) for r in art["t2i_ranks"].tolist()]
    i2t, images = per["text_retrieval_recall@1"]
    assert images.tolist() == list(range(len(data.images)))
    assert i2t.tolist() == [float(r == 1) for r in art["i2t_ranks"].tolist()]
    for key, vals in (("image_retrieval_recall@1", t2i), ("text_retrieval_recall@1", i2t)):
        assert vals.mean().item() == pytest.approx(metrics[key], abs=1e-6)


def test_the_benchmark_asks_the_task_object(monkeypatch: pytest.MonkeyPatch) -> None:
    task = task_object("grouping")
    seen = []
    monkeypatch.setattr(task, "per_image_values", lambda d, a, m: seen.append(a) or {"x": 1})
    assert per_image_values("grouping", None, {"per_item": {}}, {}) == {"x": 1} and seen
    overridden = {"zeroshot", "retrieval", "region", "hardneg", "compositional"}
    for name in overridden:  # the five tasks whose values are not in their artefacts
        assert type(task_object(name)).per_image_values is not EvalTask.per_image_values, name
    for name in ("segmentation", "linear_probe", "grouping"):
        assert type(task_object(name)).per_image_values is EvalTask.per_image_values, name


@dataclass
class PlainConfig(EvalTaskConfig):
    task: str = "doc_plain_per_image"


def test_a_task_registered_as_a_function_gets_the_generic_values() -> None:
    if PlainConfig.task not in EVAL_TASKS.names():
        task_kind(PlainConfig.task)(PlainConfig)
        EVAL_TASKS.add(PlainConfig.task, lambda ctx, cfg, data: ({}, {}))
    art = {"per_image": {"hit": [1, 0, 1]}, "per_item": {"j": ([0.5, 1.0], [0, 2])}}
    per = per_image_values(PlainConfig.task, None, art, {})
    assert per["hit"][0].tolist() == [1.0, 0.0, 1.0] and per["hit"][1].tolist() == [0, 1, 2]
    assert per["j"][0].dtype == torch.float64 and per["j"][1].tolist() == [0, 2]
