"""Every user-facing failure of the ``finegrain`` command is one line on stderr and exit code 2,
never a traceback: each case runs the real command in its own process (all at once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]


class Evil:
    def __reduce__(self):  # noqa: ANN204
        return (os.system, ("echo PWNED > pwned.txt",))


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (finegrain argv, text the one error line must contain)."""
    ck = tmp / "run" / "ckpt" / "step_0000002"
    ck.mkdir(parents=True)
    save_file({"w": torch.zeros(64)}, str(ck / "model.safetensors"))
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) - 40])  # truncated download
    torch.save({"step": 2, "evil": Evil()}, ck / "state.pt")
    evil_ck = tmp / "evil" / "step_0000002"
    evil_ck.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, str(evil_ck / "model.safetensors"))
    torch.save({"step": 2, "evil": Evil()}, evil_ck / "state.pt")
    cut_ck = tmp / "cut" / "step_0000002"
    cut_ck.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, str(cut_ck / "model.safetensors"))
    torch.save({"step": 2, "x": torch.zeros(1000)}, cut_ck / "state.pt")
    (cut_ck / "state.pt").write_bytes((cut_ck / "state.pt").read_bytes()[:300])
    torch.save({"w": torch.zeros(2)}, tmp / "weights.pt")
    (tmp / "evil.yaml").write_text("name: !!python/object/apply:os.system ['echo PWNED']\n")
    (tmp / "m.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": "x"}) + "\n")
    (tmp / "used").mkdir()
    (tmp / "used" / "00000.tar").write_bytes(b"")
    train = ["train", "--recipe", "clip_smoke", "--output-dir", str(tmp / "out")]
    return {
        "truncated safetensors": (["eval", "--checkpoint", str(ck / "model.safetensors")],
                                  "model.safetensors: truncated"),
        "malicious pickle": ([*train, "--resume", str(evil_ck)], "refused to load"),
        "truncated state": ([*train, "--resume", str(cut_ck)], "corrupt checkpoint"),
        "wrong file kind": (["eval", "--checkpoint", str(tmp / "weights.pt")],
                            "expected a .safetensors"),
        "cuda without GPU (train)": ([*train, "train.device=cuda"], "CUDA is not available"),
        "cuda without GPU (eval)": (["eval", "--checkpoint", str(ck), "--device", "cuda"],
                                    "CUDA is not available"),
        "config executes code": (["train", "--config", str(tmp / "evil.yaml")],
                                 "could not determine a constructor"),
        "convert into used folder": (["data", "convert", "--manifest", str(tmp / "m.jsonl"),
                                      "--out", str(tmp / "used")], "--overwrite"),
    }  # fmt: skip


def test_every_cli_failure_is_one_line_exit_2(tmp_path, faults):
    if torch.cuda.is_available():
        import pytest

        pytest.skip("the no-GPU cases need a machine without CUDA")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cases = _cases(tmp_path)
    procs = {name: subprocess.Popen([sys.executable, "-m", "finegrain.cli", *argv], cwd=tmp_path,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for name, (argv, _) in cases.items()}  # fmt: skip
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}: {err[-2000:]}"
        assert "Traceback" not in err, f"{name}: {err[-2000:]}"
        assert len(lines) == 1 and cases[name][1] in lines[0], f"{name}: {lines}"
        print(f"{name}: {lines[0]}")
    assert not (tmp_path / "pwned.txt").exists(), "a pickle or a config executed code"
    faults.record("CLI user-facing failures", injected=len(cases), survived=len(cases))
