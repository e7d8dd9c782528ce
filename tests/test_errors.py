"""finegrain.errors.run_subcommand, the one entry wrapper of ``finegrain eval``, ``predict``,
``export`` and the backbone export: a user mistake is one line on stderr and exit 2, our own
bugs keep their traceback (issue 29)."""

from __future__ import annotations

import argparse

import pytest
from PIL import Image

from finegrain import eval_cli, predict
from finegrain.config import ConfigError
from finegrain.errors import USER_ERROR, run_subcommand
from finegrain.interop import backbone, export


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finegrain thing")
    p.add_argument("--n", type=int, default=0)
    return p


def _err_line(capsys) -> str:
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad value\nsecond line"),
        ConfigError("bad value"),
        FileNotFoundError("bad value"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(capsys, error):
    def run(args):
        raise error

    assert run_subcommand("finegrain thing", _parser(), run, []) == USER_ERROR == 2
    assert _err_line(capsys) == "finegrain thing: error: bad value"


def test_status_is_passed_through_and_none_is_0(capsys):
    assert run_subcommand("finegrain thing", _parser(), lambda a: a.n, ["--n", "3"]) == 3
    assert run_subcommand("finegrain thing", _parser(), lambda a: None, []) == 0
    assert capsys.readouterr().err == ""


def test_our_bugs_and_usage_errors_are_not_swallowed():
    def run(args):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_subcommand("finegrain thing", _parser(), run, [])
    with pytest.raises(SystemExit) as e:  # argparse's own usage error, also exit 2
        run_subcommand("finegrain thing", _parser(), run, ["--n", "x"])
    assert e.value.code == 2


@pytest.mark.parametrize(
    ("main", "argv", "prefix"),
    [
        (eval_cli.main, ["--checkpoint", "{missing}", "--task", "zeroshot"], "finegrain eval"),
        (
            predict.main,
            ["--checkpoint", "{missing}", "--images", "{tmp}/x.png", "--classes", "a,b"],
            "finegrain predict",
        ),
        (export.main, ["{missing}", "--format", "towers", "--out", "{tmp}/o"], "finegrain export"),
        (backbone.main, ["{missing}", "{tmp}/o.pth"], "finegrain backbone export"),
    ],
)
def test_every_subcommand_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys, main, argv,
                                                                   prefix):  # fmt: skip
    missing = tmp_path / "no_such_run"
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    argv = [a.format(missing=missing, tmp=tmp_path) for a in argv]
    assert main(argv) == USER_ERROR
    line = _err_line(capsys)
    assert line.startswith(f"{prefix}: error: ") and "no_such_run" in line, line
