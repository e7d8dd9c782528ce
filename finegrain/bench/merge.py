"""``finegrain demo --merge DIR [DIR ...]``: one report from benchmark runs of other seeds.

The claims' intervals narrow with seeds, and seeds are independent runs: ``--seed-start K``
trains seeds K .. K+N-1 alone (another session, node or machine), and ``--merge`` pools the
runs of several report folders into one report, as if one ``--seeds`` run had trained them
all. Every run keeps its per-image results (``runs/<method>/seed<k>/results.pt``, loaded with
``weights_only=True``), so the merged claims are the same paired bootstrap over images and
seeds. Refused, in one line each: a folder without a report or without saved runs, budgets that
differ (every field must match), different method sets, a (method, seed) trained twice.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from finegrain.bench.config import Budget
from finegrain.bench.run import RUN_RESULTS, MethodRun, Options, check_output, load_run, run_rank


def _read(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"--merge {folder}: no results.json (not a finegrain demo report)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--merge {folder}: results.json is not valid JSON ({e})") from None


def _runs(folder: Path, data: dict[str, Any]) -> list[MethodRun]:
    runs = []
    for row in data["timing"]:
        path = folder / "runs" / row["method"] / f"seed{row['seed']}" / RUN_RESULTS
        if not path.is_file():
            raise FileNotFoundError(f"--merge {folder}: {path.relative_to(folder)} is missing "
                                    "(a run made before runs kept their per-image results, or "
                                    "a folder whose runs/ was removed)")  # fmt: skip
        runs.append(load_run(path))
    return runs


def budget_from(described: dict[str, Any]) -> Budget:
    """The Budget a report's ``budget`` entry describes (derived entries dropped)."""
    names = {f.name for f in dataclasses.fields(Budget)}
    return Budget(**{k: v for k, v in described.items() if k in names})


def merge_reports(folders: list[Path], out: Path, overwrite: bool = False,
                  command: str = "finegrain demo --merge") -> Path:  # fmt: skip
    """Write one report into ``out`` from the runs of ``folders``; returns its report.md."""
    from finegrain.bench.report import write_outputs

    if len(folders) < 2:
        raise ValueError("--merge needs at least two report folders")
    if any(out.resolve() == f.resolve() for f in folders):
        raise ValueError(f"--out {out} is one of the folders being merged; choose another")
    check_output(out, overwrite)
    datas = [_read(f) for f in folders]
    first = datas[0]
    for f, d in zip(folders[1:], datas[1:]):
        diff = sorted(k for k in set(first["budget"]) | set(d["budget"])
                      if first["budget"].get(k) != d["budget"].get(k))  # fmt: skip
        if diff:
            raise ValueError(f"--merge {f}: its budget differs from {folders[0]}'s in "
                             f"{', '.join(diff)}; only runs of one budget can be pooled")  # fmt: skip
        if sorted(d["methods"]) != sorted(first["methods"]):
            raise ValueError(f"--merge {f}: methods {', '.join(d['methods'])} differ from "
                             f"{folders[0]}'s ({', '.join(first['methods'])})")  # fmt: skip
    runs: list[MethodRun] = []
    seen: dict[tuple[str, int], Path] = {}
    for f, d in zip(folders, datas):
        for r in _runs(f, d):
            if (r.method, r.seed) in seen:
                raise ValueError(f"--merge {f}: {r.method} seed {r.seed} is also in "
                                 f"{seen[(r.method, r.seed)]}; merge runs of distinct seeds "
                                 "(finegrain demo --seed-start)")  # fmt: skip
            seen[(r.method, r.seed)] = f
            runs.append(r)
    methods = first["methods"]
    runs.sort(key=lambda r: run_rank(r, methods))
    seeds = sorted({r.seed for r in runs})
    lowest = min(zip(folders, datas), key=lambda fd: min(t["seed"] for t in fd[1]["timing"]))[0]
    out.mkdir(parents=True, exist_ok=True)
    opts = Options(methods, budget_from(first["budget"]), len(seeds), out, overwrite,
                   command=command, jobs=int(first.get("jobs", 1)))  # fmt: skip
    parts = [{"folder": str(f), "command": d["command"], "date": d["date"],
              "wall_s": d["wall_s"], "seeds": sorted({t["seed"] for t in d["timing"]}),
              "machine": f"{d['machine']['cpu']}, {d['machine']['cores']} cores"}
             for f, d in zip(folders, datas)]  # fmt: skip
    extra = {"cpu_s": round(sum(d.get("cpu_s", 0.0) for d in datas), 2), "merged_from": parts,
             "parent_cache_s": round(sum(d.get("parent_cache_s", 0.0) for d in datas), 2),
             "jobs": opts.jobs, "bottom_cache": first.get("bottom_cache")}  # fmt: skip
    wall = sum(d["wall_s"] for d in datas)
    return write_outputs(opts, runs, wall, extra, figures_from=lowest)
