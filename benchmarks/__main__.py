"""Run every ``benchmarks/bench_*.py`` and collect one JSON document plus a Markdown table.

    python -m benchmarks                  # CPU: each script with --quick; GPU: its defaults
    python -m benchmarks --only efficientnet --only clippy
    python -m benchmarks --timeout 600 --out results.json

Scripts are found by the glob ``bench_*.py``. Each runs in its own subprocess
(``PYTHONPATH`` = the repository root) so peak memory and threads are not shared. On CPU a
script is passed ``--quick`` when its source mentions that flag (the convention in
``benchmarks/_common.py``); others run with their defaults under ``--timeout``. The last JSON
object a script prints on stdout is its result; every numeric key ending in ``ratio`` goes into
the Markdown table (ours / reference).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import machine_info

HERE = Path(__file__).resolve().parent


def discover(only: list[str] | None = None) -> list[Path]:
    scripts = sorted(HERE.glob("bench_*.py"))
    names = {s.stem.removeprefix("bench_"): s for s in scripts}
    if not only:
        return scripts
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {sorted(names)}")
    return [names[n] for n in only]


def last_json(stdout: str) -> dict[str, Any] | None:
    """The last complete JSON object in a script's stdout (pretty-printed or one line)."""
    dec = json.JSONDecoder()
    found = None
    for i, ch in enumerate(stdout):
        if ch == "{" and (i == 0 or stdout[i - 1] == "\n"):
            try:
                obj, _ = dec.raw_decode(stdout[i:])
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                found = obj
    return found


def run_script(script: Path, quick: bool, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(script)]
    if quick and "--quick" in script.read_text():
        cmd.append("--quick")
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "command": " ".join(cmd), "wall_s": timeout}
    out: dict[str, Any] = {"command": " ".join(cmd), "wall_s": time.perf_counter() - t0}
    result = last_json(proc.stdout)
    if proc.returncode != 0 or result is None:
        out.update(status="error", returncode=proc.returncode, stderr_tail=proc.stderr[-2000:])
    else:
        out.update(status="ok", result=result)
    return out


def ratios(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric entries whose key ends in 'ratio', nested keys joined by '.'."""
    found: dict[str, float] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            found.update(ratios(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and key.endswith("ratio"):
            found[prefix + key] = float(value)
    return found


def markdown(runs: dict[str, dict[str, Any]]) -> str:
    lines = ["| benchmark | ratio (ours / reference) | value |", "|---|---|---|"]
    for name, run in runs.items():
        if run["status"] != "ok":
            lines.append(f"| {name} | {run['status']} | |")
            continue
        for key, value in ratios(run["result"]).items():
            lines.append(f"| {name} | {key} | {value:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", help="benchmark name (bench_NAME.py), repeatable")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per script")
    p.add_argument("--full", action="store_true", help="on CPU too, run scripts' defaults")
    p.add_argument("--out", default="", help="also write the JSON document to this file")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = device == "cpu" and not a.full
    runs = {}
    for script in discover(a.only):
        name = script.stem.removeprefix("bench_")
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        runs[name] = run_script(script, quick, a.timeout)
    doc = {"machine": machine_info(device), "quick": quick, "runs": runs}
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=2, default=str))
    print(json.dumps(doc, indent=2, default=str))
    print(markdown(runs))
    return doc


if __name__ == "__main__":
    main()
