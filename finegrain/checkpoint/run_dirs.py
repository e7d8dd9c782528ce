"""Find the run under a folder: what ``finegrain.load``, ``predict``, ``eval --checkpoint`` and
``export`` accept besides a run directory itself.

A *run directory* holds ``config.yaml`` (and ``ckpt/``). ``finegrain demo --out OUT`` writes one
per method and seed, ``OUT/runs/<method>/seed<k>/``, so ``OUT``, ``OUT/runs`` and
``OUT/runs/<method>`` are folders *of* runs: ``resolve_run`` returns the one run beneath such a
folder, and refuses with one line listing them when there are several. A leaf module: the
checkpoint code imports its file names from here.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
CKPT_DIR = "ckpt"
SEARCH_DEPTH = 3  # OUT/runs/<method>/seed<k>: the demo's layout
SHOWN = 8  # runs named in the "several runs" message


def is_run_or_checkpoint(path: Path) -> bool:
    """A file, a checkpoint directory (``model.safetensors``) or a run directory."""
    return (
        path.is_file()
        or (path / MODEL_FILE).is_file()
        or (path / CONFIG_FILE).is_file()
        or (path / CKPT_DIR).is_dir()
    )


def _natural(path: Path) -> list[object]:
    """Sort key: ``seed2`` before ``seed10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def find_runs(root: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    """Run directories at most ``depth`` levels below ``root`` (not inside other runs, not in
    hidden folders), in natural order."""
    found: list[Path] = []
    level = [root]
    for _ in range(depth):
        nxt: list[Path] = []
        for folder in level:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir())
            except OSError:  # unreadable folder: nothing to find there
                continue
            for child in children:
                if child.name.startswith("."):
                    continue
                (found if (child / CONFIG_FILE).is_file() else nxt).append(child)
        level = nxt
    return sorted(found, key=_natural)


def resolve_run(path: str | Path) -> Path:
    """``path`` itself when it is a file, a checkpoint or a run directory; else the single run
    under it (a demo folder, its ``runs/`` or a method folder ``runs/<method>``).

    ``FileNotFoundError`` when ``path`` does not exist or holds no run, ``ValueError`` when it
    holds several (both one line saying what to pass instead)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint not found: {path} (pass a run folder, a `finegrain demo` output folder "
            "or OUT/runs/<method> under it, a checkpoint folder or a model.safetensors file)"
        )
    if is_run_or_checkpoint(path):
        return path
    runs = find_runs(path)
    if not runs:
        raise FileNotFoundError(
            f"no finegrain run under {path}: pass a run folder (config.yaml + ckpt/, e.g. "
            "OUT/runs/clip/seed0 of `finegrain demo --out OUT`), a checkpoint folder or a "
            "model.safetensors file"
        )
    if len(runs) > 1:
        names = [r.relative_to(path).as_posix() for r in runs]
        more = f", ... ({len(names)} in all)" if len(names) > SHOWN else ""
        raise ValueError(
            f"{path} holds {len(runs)} runs: {', '.join(names[:SHOWN])}{more}; pass one of "
            f"them, e.g. {path / names[0]}"
        )
    return runs[0]


__all__ = ["CONFIG_FILE", "MODEL_FILE", "find_runs", "is_run_or_checkpoint", "resolve_run"]
