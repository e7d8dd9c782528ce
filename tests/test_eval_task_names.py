"""Result names are keys that reports, claims and saved results read: ``task_prefix`` of a
representative set of configs (every built-in task kind, several non-default fields combined)
pinned to the strings the code gave before each task's name modifiers moved onto its task
object (issue #28 item 3). The order of modifiers within a name is part of the name."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import pytest

from finegrain.eval import task_prefix
from finegrain.eval.config import EvalTaskConfig, task_kind
from finegrain.eval.task import EvalTask, task_object
from finegrain.registry import EVAL_TASKS

NAMES = [
    ({"task": "zeroshot"}, "zeroshot/synthetic"),
    ({"task": "zeroshot", "variant": "novel", "scoring": "conditioned", "descriptions": "builtin",
      "fusion_alpha": 0.5, "context_length": 77, "truncate": "stretch"},
     "zeroshot/synthetic/novel+conditioned+desc+alpha0.5+ctx77+stretch"),
    ({"task": "zeroshot", "dataset": "cifar10", "descriptions": "d.json", "truncate": "stretch"},
     "zeroshot/cifar10/desc+stretch"),
    ({"task": "retrieval"}, "retrieval/synthetic"),
    ({"task": "retrieval", "variant": "long", "scoring": "rerank", "rerank_k": 10,
      "context_length": 248, "truncate": "stretch"},
     "retrieval/synthetic/long+rerank+k10+ctx248+stretch"),
    ({"task": "retrieval", "dataset": "flickr8k", "scoring": "conditioned"},
     "retrieval/flickr8k/conditioned"),
    ({"task": "segmentation"}, "segmentation/synthetic"),
    ({"task": "segmentation", "dataset": "voc", "context_length": 32, "background": "sky,ground",
      "image_size": 448, "dense_variant": "naclip", "slide_size": 224,
      "dense_block": "attention_only", "gaussian_std": 3.0},
     "segmentation/voc/ctx32+bg+448px+naclip+slide224+attention_only+sigma3"),
    ({"task": "segmentation", "dense_variant": "sclip", "gaussian_std": 5.0},
     "segmentation/synthetic/sclip"),
    ({"task": "grouping"}, "grouping/synthetic"),
    ({"task": "grouping", "variant": "x", "context_length": 16, "image_size": 320},
     "grouping/synthetic/x+ctx16+320px"),
    ({"task": "linear_probe"}, "linear_probe/synthetic"),
    ({"task": "linear_probe", "variant": "x", "context_length": 8, "epochs": 3},
     "linear_probe/synthetic/x+ctx8"),
    ({"task": "region"}, "region/synthetic/crop"),
    ({"task": "region", "dataset": "coco", "descriptions": "builtin", "context_length": 77,
      "image_size": 448, "mode": "regions", "region_scoring": "released", "margin": 0.25},
     "region/coco/desc+ctx77+448px+regions+released+margin0.25"),
    ({"task": "region", "mode": "roialign", "margin": 0.1}, "region/synthetic/roialign+margin0.1"),
    ({"task": "hardneg"}, "hardneg/synthetic"),
    ({"task": "hardneg", "dataset": "fgovd", "variant": "hard", "scoring": "conditioned",
      "context_length": 77, "region": "roialign"},
     "hardneg/fgovd/hard+conditioned+ctx77+roialign"),
    ({"task": "compositional"}, "compositional/synthetic"),
    ({"task": "compositional", "dataset": "sugarcrepe", "variant": "replace_att",
      "scoring": "conditioned", "context_length": 64},
     "compositional/sugarcrepe/replace_att+conditioned+ctx64"),
    ({"task": "zeroshot", "name": "custom/name", "scoring": "conditioned"}, "custom/name"),
    ({"task": "zeroshot", "variant": "shape", "fusion_alpha": 0.25, "context_length": 16,
      "truncate": "stretch"}, "zeroshot/synthetic/shape+alpha0.25+ctx16+stretch"),
    ({"task": "retrieval", "scoring": "rerank", "context_length": 77},
     "retrieval/synthetic/rerank+k20+ctx77"),
    ({"task": "region", "image_size": 320, "mode": "regions", "context_length": 8},
     "region/synthetic/ctx8+320px+regions"),
    ({"task": "hardneg", "region": "crop", "context_length": 77}, "hardneg/synthetic/ctx77+crop"),
    ({"task": "segmentation", "dense_block": "residual_ffn", "gaussian_std": 2.5,
      "background": "sky"}, "segmentation/synthetic/bg+residual_ffn+sigma2.5"),
    ({"task": "grouping", "variant": "v", "image_size": 224}, "grouping/synthetic/v+224px"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "expected"), NAMES, ids=[n for _, n in NAMES])
def test_result_names_do_not_change(fields: dict, expected: str) -> None:
    assert task_prefix(EvalTaskConfig(**fields)) == expected


def test_no_task_specific_field_is_read_in_task_prefix() -> None:
    """task_prefix reads the fields every config has; the rest comes from the task object."""
    import inspect

    source = inspect.getsource(task_prefix)
    assert "getattr" not in source
    common = {f.name for f in dataclasses.fields(EvalTaskConfig)}
    assert set(re.findall(r"cfg\.(\w+)", source)) <= common


def test_a_task_places_its_own_modifiers_around_the_context_length(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task = task_object("linear_probe")
    monkeypatch.setattr(task, "leading_modifiers", lambda cfg: ["lead", ""])
    monkeypatch.setattr(task, "modifiers", lambda cfg: ["", f"ep{cfg.epochs}"])
    cfg = EvalTaskConfig(task="linear_probe", variant="v", context_length=8, epochs=3)
    assert task_prefix(cfg) == "linear_probe/synthetic/v+lead+ctx8+ep3"


@dataclass
class PlainConfig(EvalTaskConfig):
    task: str = "doc_plain_function"
    scoring: str = "conditioned"


def test_a_task_registered_as_a_function_gets_the_common_modifiers() -> None:
    """The older layout (a plain function in EVAL_TASKS): no task object, so only the variant
    and context length name it, whatever fields its config has."""
    if PlainConfig.task not in EVAL_TASKS.names():
        task_kind(PlainConfig.task)(PlainConfig)
        EVAL_TASKS.add(PlainConfig.task, lambda ctx, cfg, data: ({}, {}))
    cfg = EvalTaskConfig(task=PlainConfig.task, variant="v", context_length=8)
    assert task_object(cfg.task) is None and cfg.scoring == "conditioned"
    assert task_prefix(cfg) == "doc_plain_function/synthetic/v+ctx8"


def test_every_built_in_kind_is_pinned() -> None:
    kinds = {"zeroshot", "retrieval", "segmentation", "grouping", "linear_probe", "region",
             "hardneg", "compositional"}  # fmt: skip
    assert {f["task"] for f, _ in NAMES} == kinds
    assert all(isinstance(task_object(k), EvalTask) for k in kinds)
