"""README.md is a walk-through that runs (issue 30): the test reads README.md itself, so an
edited README is re-tested.

- Unmarked ```bash and ```python blocks run as written, in README order, in one temporary folder
  that holds the output of ``finegrain demo --quick --out demo`` as ``demo/`` (a copy of the
  session's one run, tests/conftest.py ``quick_demo``), ``../shared`` linked next to it when
  the repository has one.
  Shell blocks run in bash with ``finegrain`` and ``python`` on PATH meaning this checkout and
  this interpreter, ``FINEGRAIN_HOME`` inside the folder; Python blocks run in this process.
- Marker convention: a block CI cannot run carries, on the line above its opening fence,
  ``<!-- needs: NEED[, NEED...] -- optional note -->`` with NEED one of
  ``helpers.readme.NEEDS`` (gpu, cluster, flickr8k, data, model-file, time, network, suite,
  server). A marked block is validated instead: Python compiled, every command parsed
  (finegrain lines by the CLI's own parsers, recipes and overrides resolved, eval task specs
  checked; scripts, modules, pytest paths and markers, pip extras checked to exist). A block
  whose only need is flickr8k runs when ../shared/data/flickr8k exists.
- Every block, run or not, is validated first (cheap, one test per block).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.readme import README, ROOT, Block, CommandError, check_block, readme_blocks

try:  # a malformed marker fails test_readme_markers_are_well_formed, not the collection
    BLOCKS = readme_blocks(README.read_text())
except ValueError:
    BLOCKS = []
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"


def test_readme_markers_are_well_formed() -> None:
    assert readme_blocks(README.read_text()), "README.md has no code blocks"


def _has_flickr8k() -> bool:
    return (FLICKR8K / "captions.jsonl").is_file()


@pytest.mark.parametrize("block", BLOCKS, ids=[f"L{b.line}-{b.lang or 'text'}" for b in BLOCKS])
def test_every_block_parses_and_its_commands_validate(block: Block) -> None:
    check_block(block)


def test_readme_walk_through_is_executed() -> None:
    """The load / predict / eval / export walk-through is among the blocks that run."""
    runnable = "".join(b.code for b in BLOCKS if b.runnable(flickr8k=False))
    for needle in ("finegrain.load(", "finegrain predict", "finegrain eval", "finegrain export"):
        assert needle in runnable, f"no runnable README block contains {needle!r}"
    assert any(b.needs and "finegrain demo" in b.code for b in BLOCKS)  # the top's, validated


def _shims(folder: Path) -> Path:
    """``finegrain`` and ``python`` on PATH: this interpreter, this checkout."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    exe = shlex.quote(sys.executable)
    for name, body in (("finegrain", f"{exe} -m finegrain.cli"), ("python", exe),
                       ("python3", exe)):  # fmt: skip
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {body} "$@"\n')
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, quick_demo, one_thread_module) -> tuple[Path, dict[str, str]]:
    """(folder holding demo/, a copy of the session's ``finegrain demo --quick`` output
    (tests/conftest.py ``quick_demo``), environment)."""
    if shutil.which("bash") is None:
        pytest.skip("README shell blocks need bash")
    root = tmp_path_factory.mktemp("readme")
    work = root / "work"
    work.mkdir()
    if (ROOT.parent / "shared").is_dir():  # README paths like ../shared/data/flickr8k
        (root / "shared").symlink_to(ROOT.parent / "shared")
    # README blocks may write next to the runs: a folder of their own, its files hard links
    # (the demo's checkpoints are ~300 MB; nothing rewrites a file in place)
    shutil.copytree(quick_demo, work / "demo", copy_function=_link_or_copy)
    env = dict(os.environ)
    env["PATH"] = f"{_shims(root)}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(FINEGRAIN_HOME=str(root / "home"), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return work, env


def _run(block: Block, work: Path, env: dict[str, str]) -> None:
    if block.lang == "python":
        scope = {"__name__": "__main__"}
        exec(compile(block.code, block.where, "exec"), scope)  # noqa: S102 (our README)
        return
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        pytest.fail(f"{block.where}: exit {done.returncode}\n{block.code}--- output ---\n{tail}")


def test_readme_blocks_run_in_order(workdir, monkeypatch) -> None:
    work, env = workdir
    monkeypatch.chdir(work)
    ran = [b for b in BLOCKS if b.runnable(_has_flickr8k())]
    assert ran, "README.md has no runnable block"
    for block in ran:
        _run(block, work, env)
    assert (work / "photos").is_dir() and any((work / "eval").glob("results.json"))


# ---- the harness itself: it catches what it is there to catch ----------------------------
def test_markers_attach_to_the_next_fence_and_name_known_needs() -> None:
    text = (
        "a\n<!-- needs: gpu, time -- why -->\n\n```bash\nfinegrain recipes\n```\n```json\n{}\n```\n"
    )
    gpu, js = readme_blocks(text)
    assert gpu.needs == ("gpu", "time") and gpu.line == 4 and not gpu.runnable(True)
    assert js.lang == "json" and not js.needs and not js.runnable(True)
    flickr = readme_blocks("<!-- needs: flickr8k -->\n```bash\nls\n```\n")[0]
    assert flickr.runnable(flickr8k=True) and not flickr.runnable(flickr8k=False)
    with pytest.raises(ValueError, match="unknown need"):
        readme_blocks("<!-- needs: gpus -->\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="right above a fence"):
        readme_blocks("<!-- needs: gpu -->\ntext\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="never closed"):
        readme_blocks("```bash\nls\n")


@pytest.mark.parametrize(
    ("code", "match"),
    [
        ("finegrain train --recipe clip_smok", "clip_smoke"),  # did-you-mean from the registry
        ("finegrain train --recipe clip_smoke train.stepz=5", "train.stepz"),
        ("finegrain predict --checkpoint r --images x --top_k 2", "unrecognized arguments"),
        ("finegrain export r --format onnx", "invalid choice"),
        ("finegrain eval --checkpoint r --tasks zeroshot:synthetic/shape@bogus=1", "bogus"),
        ("torchrun --nproc_per_node 2 -m finegrain.cli train --recipe nope", "nope"),
        ('pip install -e ".[devel]"', "devel"),
        ("python -m pytest -m measurment", "unregistered marker"),
        ("python benchmarks/bench_nothing.py", "no such script"),
        ("wget http://example.com/x.tar", "no validator for 'wget'"),
    ],
)
def test_validation_rejects_mistakes(code: str, match: str) -> None:
    with pytest.raises(CommandError, match=match):
        check_block(Block(1, "bash", code + "\n", ("time",)))


def test_validation_accepts_the_readme_forms() -> None:
    code = (
        "FINEGRAIN_DATA=../x python -m pytest -q -n 2 tests/test_api.py  # comment\n"
        "finegrain eval --checkpoint a --checkpoint hf:b/ \\\n  --tasks zeroshot:synthetic/shape\n"
        "ruff check . && ruff format --check .\nfinegrain demo --quick --help\n"
    )
    check_block(Block(1, "bash", code, ("suite",)))
    with pytest.raises(CommandError, match="README.md:7"):
        check_block(Block(7, "python", "print(\n", ("gpu",)))
