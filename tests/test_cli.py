import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finegrain import cli
from finegrain.checkpoint import latest_checkpoint
from finegrain.registry import METHODS

REPO = Path(__file__).resolve().parents[1]
needs_clip = pytest.mark.skipif("clip" not in METHODS, reason="finegrain.methods.clip is missing")
QUICK = ["train.steps=2", "train.checkpoint_every=0", "eval.tasks=[]", "data.batch_size=8"]


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, f"expected one line on stderr, got {err}"
    assert "Traceback" not in err[0]
    return err[0]


def test_help_is_short_and_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "recipes", "demo", "eval", "data", "annotate"):
        assert cmd in out
    assert len(out.splitlines()) < 25


def test_recipes_lists_one_line_each(capsys):
    assert cli.main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    smoke = [ln for ln in lines if ln.startswith("clip_smoke ")]
    assert smoke and "Smoke twin of clip_vitb16" in smoke[0]
    assert any(ln.startswith("clip_flickr8k ") for ln in lines)


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (
            ["train", "--recipe", "clip_smok"],
            "unknown recipe 'clip_smok' (did you mean 'clip_smoke'?)",
        ),
        (["train", "--recipe", "clip_smoke", "train.stpes=3"], "did you mean 'steps'?"),
        (
            ["train", "--recipe", "clip_smoke", "train.steps=abc"],
            "train.steps: expected an integer",
        ),
        (
            ["train", "--recipe", "clip_smoke", "train.precision=fp8"],
            "unknown train.precision 'fp8' (did you mean 'fp32'?); valid choices: fp32, bf16, fp16",
        ),
        (["train", "--recipe", "clip_smoke", "method.name=flari"], "did you mean 'flair'"),
        (
            ["train", "--recipe", "clip_smoke", "data.source=jsonl", "data.train=nope/x.jsonl"],
            "manifest not found: nope/x.jsonl",
        ),
        (["train"], "give exactly one of --recipe NAME or --config FILE"),
        (["demo", "--method", "flar"], "did you mean 'flair'"),
    ],
)
def test_user_mistakes_are_one_line_exit_2(capsys, argv, pattern):
    assert cli.main(argv) == 2
    assert pattern in _err_line(capsys)


@needs_clip
def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "f"
    blocker.write_text("")
    argv = ["train", "--recipe", "clip_smoke", "--output-dir", str(blocker / "run"), *QUICK]
    assert cli.main(argv) == 2
    assert "not writable" in _err_line(capsys)


@needs_clip
def test_train_then_incompatible_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["train", "--recipe", "clip_smoke", "--output-dir", out, *QUICK]) == 0
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert latest_checkpoint(out).name == "step_0000002"
    capsys.readouterr()
    argv = ["train", "--recipe", "clip_smoke", "--output-dir", out, "--resume", "latest",
            *QUICK, "method.embed_dim=32"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "incompatible checkpoint" in _err_line(capsys)
    assert cli.main(["train", "--config", f"{out}/config.yaml", "--output-dir", out,
                     "--resume", "latest", "train.steps=3"]) == 0  # fmt: skip
    assert latest_checkpoint(out).name == "step_0000003"
    ev = ["eval", "--checkpoint", out, "--tasks", "retrieval:synthetic@num_samples=16",
          "--out", str(tmp_path / "ev")]  # fmt: skip
    assert cli.main(ev) == 0, "finegrain eval loads the run through load_run"
    assert (tmp_path / "ev" / "results.json").is_file()
    capsys.readouterr()
    assert cli.main(["train", "--recipe", "clip_smoke", "--resume", str(tmp_path / "none"),
                     "--output-dir", out, *QUICK]) == 2  # fmt: skip
    assert "not a checkpoint" in _err_line(capsys)


def test_subcommands_dispatch_lazily(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("fake_cli")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "finegrain.annotate.cli", fake)
    assert cli.main(["annotate", "--x", "1"]) == 0 and seen["argv"] == ["--x", "1"]
    monkeypatch.setitem(cli.SUBCOMMANDS, "annotate", ("finegrain.not_there.cli", ""))
    with pytest.raises(ModuleNotFoundError, match="finegrain.not_there"):  # a broken install
        cli.main(["annotate"])


def _cli_cmd(out, *extra):
    return [sys.executable, "-m", "finegrain.cli", "train", "--recipe", "clip_smoke",
            "--output-dir", str(out), "train.steps=8", "train.checkpoint_every=2", "eval.tasks=[]",
            "data.batch_size=8", "data.num_workers=1", *extra]  # fmt: skip


@needs_clip
@pytest.mark.slow
def test_cli_sigkill_resume_bitwise(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    ref = subprocess.run(_cli_cmd(tmp_path / "ref"), env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli_cmd(run), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = latest_checkpoint(run)
        if found is not None and found.name >= "step_0000004":
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = latest_checkpoint(run)
    assert killed_at is not None and killed_at.name < "step_0000008", "kill came too late"
    res = subprocess.run(_cli_cmd(run, "--resume", "latest"), env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    a = load_file(str(latest_checkpoint(tmp_path / "ref") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert latest_checkpoint(run).name == "step_0000008"
    for k in a:
        assert torch.equal(a[k], b[k]), k
