"""One way to load a model: ``finegrain.load``, ``finegrain eval --checkpoint``, ``finegrain
export`` and the timm backbone export all reach ``finegrain.checkpoint.load_run`` through
``finegrain.interop.load_spec`` (docs/ARCHITECTURE.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import finegrain
import finegrain.interop as interop
from finegrain.checkpoint import CheckpointError, load_run
from finegrain.encoders.export import image_backbone_to_timm
from finegrain.eval_cli import main as eval_main
from finegrain.interop.backbone import main as backbone_main
from finegrain.interop.export import export

from helpers.interop import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("load") / "run", "clip_smoke")


def test_every_caller_loads_a_run_through_load_run(run, tmp_path, monkeypatch):
    calls: list[str] = []

    def counted(path, **kw):  # noqa: ANN001, ANN003, ANN202
        calls.append(str(path))
        return load_run(path, **kw)

    monkeypatch.setattr(interop, "load_run", counted)
    finegrain.load(str(run))
    tasks = "retrieval:synthetic@num_samples=8"
    assert eval_main(["--checkpoint", str(run), "--tasks", tasks, "--out", str(tmp_path / "ev"),
                      "--quiet"]) == 0  # fmt: skip
    export(str(run), "towers", tmp_path / "towers")
    assert backbone_main([str(run), str(tmp_path / "b.pth")]) == 0
    assert calls == [str(run)] * 4


def test_backbone_export_writes_the_loaded_runs_tower(run, tmp_path, capsys):
    assert backbone_main([str(run), str(tmp_path / "b.pth")]) == 0
    method, _, weights = load_run(run)
    assert weights is not None and weights.parent.parent.parent == run
    sd, kwargs = image_backbone_to_timm(method.image)
    saved = torch.load(tmp_path / "b.pth", weights_only=True)
    assert saved["timm_kwargs"] == kwargs and saved["state_dict"].keys() == sd.keys()
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in sd.items())
    capsys.readouterr()
    assert backbone_main([str(tmp_path / "missing"), str(tmp_path / "c.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "checkpoint not found" in err


def test_other_formats_hint_comes_from_the_spec_layer(tmp_path):
    (tmp_path / "openai.pt").write_bytes(b"not a finegrain file")
    with pytest.raises(CheckpointError) as plain:
        load_run(tmp_path / "openai.pt")
    assert "spec prefix" not in str(plain.value)
    with pytest.raises(CheckpointError, match="need a spec prefix: open_clip:, hf:, flair:"):
        interop.load_spec(str(tmp_path / "openai.pt"))
