"""Method hooks a teacher needs (frozen modules, after_optimizer_step) and the stats channel."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from finegrain.checkpoint import latest_checkpoint
from finegrain.train.optim import build_optimizer
from finegrain.train.trainer import Trainer

from helpers.toy_method import (
    StatsLoader,
    ToyEMA,
    ToyEMAConfig,
    ToyLoader,
    toy_run_config,
    toy_trainer,
)


class _Crash(ToyLoader):
    """Dies fetching the batch of index ``after`` (an interrupted run)."""

    def __init__(self, after: int) -> None:
        super().__init__(batch_size=8)
        self.after = after

    def __iter__(self):
        for i, b in enumerate(super().__iter__()):
            if i == self.after:
                raise RuntimeError("simulated crash")
            yield b


def _ema(**kw) -> ToyEMAConfig:
    return ToyEMAConfig(dropout=0.1, **kw)


def test_after_optimizer_step_only_after_applied_steps(tmp_path):
    cfg = toy_run_config(tmp_path, 6, nan_policy="skip")
    cfg.method.nan_after = 3  # steps 4.. are non-finite and skipped
    tr = Trainer(cfg, loader=ToyLoader())
    summary = tr.fit()
    assert summary["skipped_steps"] == 3
    assert tr.method.hook_calls == [(1, 6), (2, 6), (3, 6)]


def test_teacher_is_frozen_out_of_the_optimizer_and_in_eval_mode(tmp_path):
    tr = toy_trainer(tmp_path, steps=4, method=_ema())
    m = tr.method
    init_teacher = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    tr.fit()
    teacher_ids = {id(p) for p in m.teacher.parameters()}
    assert teacher_ids and not teacher_ids & {id(p) for p in tr.params}
    assert all(not p.requires_grad and p.grad is None for p in m.teacher.parameters())
    m.train()
    assert m.training and m.image_proj.training and not m.teacher.training
    assert not any(mod.training for mod in m.teacher.modules())
    # the EMA moved the teacher towards the student, and the centre left zero
    w = "0.weight"
    assert not torch.equal(m.teacher.state_dict()[w], init_teacher[w])
    assert not torch.equal(m.teacher.state_dict()[w], m.image_proj.state_dict()[w])
    assert m.center.abs().sum() > 0
    assert {"teacher.0.weight", "center"} <= set(m.state_dict())
    # even a param_groups that lists the teacher cannot put it in the optimizer
    for p in m.teacher.parameters():
        p.requires_grad_(True)
    m.param_groups = lambda wd, **kw: [{"params": list(m.parameters()), "weight_decay": wd}]
    opt = build_optimizer(m, tr.t)
    assert not teacher_ids & {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(p.requires_grad for p in m.teacher.parameters())


def test_teacher_and_centre_resume_bitwise(tmp_path):
    full = toy_trainer(tmp_path / "full", steps=8, checkpoint_every=4, method=_ema())
    full_summary = full.fit()
    ref = full.method.state_dict()
    first = toy_trainer(tmp_path / "part", steps=8, checkpoint_every=4, method=_ema())
    first.loader = _Crash(after=6)  # dies fetching step 7's batch
    with pytest.raises(RuntimeError, match="crash"):
        first.fit()
    assert latest_checkpoint(tmp_path / "part").name == "step_0000004"
    second = toy_trainer(tmp_path / "part", steps=8, checkpoint_every=4, resume="latest",
                         method=_ema())  # fmt: skip
    assert second.step == 4
    second_summary = second.fit()
    got = second.method.state_dict()
    for k in ("teacher.0.weight", "teacher.3.bias", "center"):
        assert torch.equal(ref[k], got[k]), k
    for k, v in ref.items():
        assert torch.equal(v, got[k]), k
    assert second_summary["stats"] == full_summary["stats"] == {"teacher_rows": 64.0}


def test_fsdp_units_leave_frozen_modules_out():
    m = ToyEMA(_ema())
    units = m.fsdp_units()
    assert m.teacher not in units and m.image_proj in units
    inner = ToyEMA(_ema())
    inner.frozen_modules = lambda: {"teacher": inner.image_proj[0]}  # inside a sharded child
    with pytest.raises(ValueError, match="frozen module sits inside the FSDP unit"):
        inner.fsdp_units()


def test_stats_channel_sums_micro_batches_into_summary_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = toy_run_config(tmp_path, 3, method=_ema(), accum_steps=2, log_every=1)
    summary = Trainer(cfg, loader=StatsLoader(batch_size=8)).fit()
    # two micro-batches of 8 per step: the collate's counts are summed, the loss's taken once
    expected = {"toy_samples": 48.0, "toy_batches": 6.0, "teacher_rows": 48.0}
    assert summary["stats"] == expected
    assert json.loads((tmp_path / "summary.json").read_text())["stats"] == expected
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"stats/toy_samples", "stats/toy_batches", "stats/teacher_rows"} <= tags, tags
    assert [e.value for e in acc.Scalars("stats/toy_samples")] == [16.0, 16.0, 16.0]


def test_grain_smoke_run_logs_its_counts(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finegrain.recipes.base import get_recipe

    cfg = get_recipe("grain_smoke")
    cfg.output_dir, cfg.eval.tasks = str(tmp_path), []
    cfg.train.steps, cfg.train.accum_steps, cfg.data.batch_size = 1, 2, 4
    summary = Trainer(cfg).fit()
    stats = summary["stats"]
    assert {"regions", "dropped_boxes", "truncated_regions", "images_without_regions",
            "target_boxes", "matched_boxes"} <= set(stats), stats  # fmt: skip
    # every kept region is a target box of the (full-batch) loss, and each is matched
    assert stats["regions"] == stats["target_boxes"] == stats["matched_boxes"] > 0
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"stats/regions", "stats/matched_boxes"} <= set(acc.Tags()["scalars"])


def test_method_train_keeps_frozen_modules_in_eval_without_trainer():
    m = ToyEMA(_ema())
    m.train()
    assert not m.teacher.training and not any(p.requires_grad for p in m.teacher.parameters())
    m.eval()
    m.train(True)
    assert m.image_proj.training and not m.teacher.training
    assert isinstance(m.frozen_modules()["teacher"], nn.Module)
