"""Typed choices and per-kind eval task configs of the run config (``finegrain.run_config``)."""

from __future__ import annotations

import dataclasses

import pytest

from finegrain.config import ConfigError, apply_overrides, from_dict, to_dict, validate_config
from finegrain.eval.config import (
    EvalConfig,
    EvalTaskConfig,
    RetrievalTaskConfig,
    SegmentationTaskConfig,
    ZeroShotTaskConfig,
)
from finegrain.eval_cli import parse_task
from finegrain.methods.flair import FLAIRConfig
from finegrain.recipes.base import get_recipe, steps_for_epochs
from finegrain.run_config import RunConfig, TrainConfig, validate_run


def test_loading_rejects_a_bad_choice_in_one_line():
    with pytest.raises(ConfigError) as e:
        from_dict(RunConfig, {"train": {"precision": "fp61"}})
    msg = str(e.value)
    assert msg == (
        "unknown train.precision 'fp61' (did you mean 'fp16'?); valid choices: fp32, bf16, fp16"
    )
    with pytest.raises(ConfigError, match=r"method.exchange 'all'.*valid choices: gather, ring"):
        from_dict(RunConfig, {"method": {"name": "flair", "exchange": "all"}})
    with pytest.raises(ConfigError, match="data.augment"):
        apply_overrides(RunConfig(), ["data.augment=flip"])


def test_python_built_configs_are_checked_too():
    with pytest.raises(ConfigError, match="TrainConfig.nan_policy 'ignore'.*stop, skip"):
        TrainConfig(nan_policy="ignore")
    with pytest.raises(ValueError, match="FLAIRConfig.sampling.*diverse, consecutive, random"):
        FLAIRConfig(sampling="windows")
    cfg = get_recipe("clip_smoke")
    cfg.data.source = "parquet"  # changed after construction: the tree walk names the path
    with pytest.raises(ConfigError, match=r"unknown data.source 'parquet'; valid choices"):
        validate_config(cfg)
    with pytest.raises(ValueError, match="data.source"):
        validate_run(cfg)
    cfg.data.source = "synthetic"
    cfg.eval.tasks[0].scoring = "best"
    with pytest.raises(ConfigError, match=r"eval.tasks\[0\].scoring 'best'"):
        validate_run(cfg)


def test_eval_tasks_are_one_config_per_kind():
    data = {
        "tasks": [
            {"task": "zeroshot", "variant": "novel", "templates": "plain", "fusion_alpha": 0.5},
            {"task": "retrieval", "scoring": "rerank", "rerank_k": "5"},
            {"task": "segmentation", "background_threshold": 0.3},
            {"variant": "long"},  # no task: the default kind (retrieval)
        ]
    }
    tasks = from_dict(EvalConfig, data).tasks
    kinds = [ZeroShotTaskConfig, RetrievalTaskConfig, SegmentationTaskConfig, RetrievalTaskConfig]
    assert [type(t) for t in tasks] == kinds
    assert tasks[1].rerank_k == 5 and tasks[0].fusion_alpha == 0.5
    assert from_dict(EvalConfig, to_dict(EvalConfig(tasks=tasks))).tasks == tasks
    with pytest.raises(ConfigError, match=r"'tasks\[0\].rerank_k' for task=zeroshot.*valid keys"):
        from_dict(EvalConfig, {"tasks": [{"task": "zeroshot", "rerank_k": 3}]})
    with pytest.raises(ConfigError, match="did you mean 'retrieval'"):
        from_dict(EvalConfig, {"tasks": [{"task": "retreival"}]})
    # the base class is a factory over the kinds
    t = EvalTaskConfig(task="segmentation", templates="plain")
    assert isinstance(t, SegmentationTaskConfig) and t.templates == "plain"
    assert type(dataclasses.replace(t, limit=3)) is SegmentationTaskConfig
    with pytest.raises(ConfigError, match="unknown option 'scoring' for segmentation tasks"):
        EvalTaskConfig(task="segmentation", scoring="global")
    with pytest.raises(ConfigError, match="ZeroShotTaskConfig.scoring 'rerank'"):
        ZeroShotTaskConfig(scoring="rerank")


def test_task_spec_parser_checks_options_per_kind():
    t = parse_task("retrieval:coco/karpathy=/data/c.json@scoring=rerank@rerank_k=7")
    assert isinstance(t, RetrievalTaskConfig)
    assert (t.dataset, t.variant, t.path, t.scoring, t.rerank_k) == (
        "coco",
        "karpathy",
        "/data/c.json",
        "rerank",
        7,
    )
    z = parse_task("zeroshot:synthetic/novel@descriptions=builtin", {"rerank_k": "3"})
    assert isinstance(z, ZeroShotTaskConfig) and z.descriptions == "builtin"  # rerank_k skipped
    with pytest.raises(ValueError, match="unknown option 'templates' for retrieval tasks") as e:
        parse_task("retrieval:flickr8k@templates=plain")
    assert "\n" not in str(e.value) and "valid: task, dataset" in str(e.value)
    with pytest.raises(ValueError, match="unknown evaluation task 'zeroshoot'"):
        parse_task("zeroshoot:synthetic")
    with pytest.raises(ValueError, match="scoring 'rerank'; valid choices: global, conditioned"):
        parse_task("zeroshot:synthetic@scoring=rerank")


def test_steps_for_epochs():
    assert steps_for_epochs(2_823_019, 32, 1024) == 32 * 2756  # per-epoch drop_last
    assert steps_for_epochs(2_818_000, 32, 2048, drop_last=False) == 32 * 2_818_000 // 2048
    assert steps_for_epochs(100, 0.5, 10) == 5
    with pytest.raises(ValueError, match="global_batch"):
        steps_for_epochs(100, 1, 0)
