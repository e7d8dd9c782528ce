"""Numerical and storage faults during training: NaN/inf in a loss term or a gradient is
caught by ``train.nan_policy`` (stop naming the term/parameter and the step, or skip and
count), fp16 loss-scale overflows are skipped and counted, and a full disk stops the run with
one line while the previous checkpoint stays valid and resumable."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest
import torch

from finegrain.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint
from finegrain.outputs import MethodOutput
from finegrain.train import checkpoint as ckpt
from finegrain.train.trainer import NonFiniteLossError, Trainer

from helpers.toy_method import ToyCLIP, ToyConfig, ToyLoader, toy_run_config


class AuxToy(ToyCLIP):
    """ToyCLIP plus an auxiliary loss term that turns inf/NaN at optimizer step ``bad_step``."""

    bad_step, bad_value, calls = -1, float("inf"), 0

    def loss_from_features(self, feats: dict[str, torch.Tensor]) -> MethodOutput:
        out = super().loss_from_features(feats)
        aux = 0.1 * feats["image"].float().pow(2).mean()
        self.calls += 1  # one call per optimizer step (no accumulation here)
        if self.calls == self.bad_step:
            aux = aux * self.bad_value
        return MethodOutput(loss=out.loss + aux, losses={**out.losses, "aux_loss": aux.detach()},
                            metrics=out.metrics)  # fmt: skip


def _trainer(tmp: Path, method: torch.nn.Module, steps: int = 6, **train) -> Trainer:  # noqa: ANN003
    cfg = toy_run_config(tmp, steps, method=ToyConfig(), **train)
    return Trainer(cfg, method=method, loader=ToyLoader(batch_size=8))


def _poison_grad(method: torch.nn.Module, name: str, at_step: int, value: float) -> None:
    """Make the gradient of parameter ``name`` non-finite during optimizer step ``at_step``."""
    param, calls = dict(method.named_parameters())[name], {"n": 0}

    def hook(g: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1  # one backward per optimizer step (no accumulation here)
        return g * value if calls["n"] == at_step else g

    param.register_hook(hook)


def _finite(method: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in method.state_dict().values()
               if v.is_floating_point())  # fmt: skip


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_nonfinite_loss_term_stops_naming_term_and_step(tmp_path, faults, value):
    method = AuxToy(ToyConfig())
    method.bad_step, method.bad_value = 3, value
    with pytest.raises(NonFiniteLossError, match=r"step 3: .*non-finite: aux_loss"):
        _trainer(tmp_path, method).fit()
    assert json.loads((tmp_path / "summary.json").read_text())["status"].startswith("stopped")
    faults.record("non-finite loss term (stop)", injected=1, survived=1)


def test_nonfinite_gradient_stop_names_parameter_and_step(tmp_path, faults):
    method = ToyCLIP(ToyConfig())
    _poison_grad(method, "text_proj.0.weight", at_step=4, value=float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"gradient at step 4 in text_proj.0.weight"):
        _trainer(tmp_path, method, checkpoint_every=2).fit()
    assert _finite(method), "the poisoned update was never applied"
    verify_checkpoint(latest_checkpoint(tmp_path))  # step 2: intact
    faults.record("non-finite gradient (stop)", injected=1, survived=1)


def test_nonfinite_gradient_and_term_skipped_and_counted(tmp_path, faults):
    method = AuxToy(ToyConfig())
    method.bad_step = 2
    _poison_grad(method, "image_proj.3.weight", at_step=5, value=float("inf"))
    summary = _trainer(tmp_path, method, nan_policy="skip").fit()
    assert summary["status"] == "completed" and summary["skipped_steps"] == 2
    assert _finite(method)
    faults.record("non-finite loss/grad (skip)", injected=2, survived=2)


def test_fp16_loss_scale_overflow_skipped_and_counted(tmp_path, faults):
    method = ToyCLIP(ToyConfig())
    _poison_grad(method, "image_proj.0.weight", at_step=4, value=float("inf"))
    tr = _trainer(tmp_path, method, steps=8, precision="fp16", device="cpu")
    seen: list[float] = []
    step = tr.train_step

    def watch(micro):  # noqa: ANN001, ANN202
        before = {k: v.clone() for k, v in method.state_dict().items()}
        out, applied = step(micro)
        if tr.step + 1 == 4:  # the overflow step: nothing moved, the scale went down
            assert not applied and all(torch.equal(before[k], v)
                                       for k, v in method.state_dict().items())  # fmt: skip
        seen.append(tr.scaler.get_scale())
        return out, applied

    tr.train_step = watch
    summary = tr.fit()
    assert summary["status"] == "completed" and summary["fp16_overflows"] >= 1
    assert summary["skipped_steps"] == 0, "overflows are the scaler's business, not nan_policy's"
    assert _finite(method) and seen[3] < seen[2]
    faults.record("fp16 loss-scale overflow", injected=1, survived=1)


def test_full_disk_stops_cleanly_and_previous_checkpoint_resumes(tmp_path, toy_cli, monkeypatch,
                                                                  capsys, faults):  # fmt: skip
    from finegrain import cli

    real, calls = ckpt.save_file, {"n": 0}

    def full_disk(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: half written, then ENOSPC
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    run = tmp_path / "run"
    argv = ["train", "--recipe", "toy_faults", "train.steps=6", "--output-dir", str(run)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in err and "step_0000002 is intact" in err
    assert [c.name for c in list_checkpoints(run / "ckpt")] == ["step_0000002"]
    assert not list((run / "ckpt").glob(".tmp_*")), "no half-written checkpoint left behind"
    verify_checkpoint(run / "ckpt" / "step_0000002")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed: checkpoint write" and summary["step"] == 4
    monkeypatch.setattr(ckpt, "save_file", real)  # space freed
    assert cli.main([*argv, "--resume", "latest"]) == 0
    assert "resumed from step 2" in capsys.readouterr().err
    assert latest_checkpoint(run).name == "step_0000006"
    assert math.isfinite(json.loads((run / "summary.json").read_text())["wall_s"])
    faults.record("disk full during checkpoint", injected=1, survived=1)
