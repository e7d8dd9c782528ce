"""Results as JSON (flat CLIP_benchmark-compatible metric names) and a Markdown table across
methods and tasks."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

# Metrics shown as percentages in the Markdown table (stored as fractions in JSON, like
# CLIP_benchmark).
FRACTIONS = ("recall@", "acc1", "acc5", "mean_per_class_recall", "miou", "pixel_accuracy")


def _by_method(results: dict) -> dict[str, dict[str, float]]:
    if results and all(isinstance(v, dict) for v in results.values()):
        return {str(k): dict(v) for k, v in results.items()}
    return {"model": dict(results)}


def split_key(key: str) -> tuple[str, str]:
    """'retrieval/flickr8k/image_retrieval_recall@1' -> ('retrieval/flickr8k', metric)."""
    head, _, metric = key.rpartition("/")
    return head, metric


def _natural(key: str) -> tuple:
    """Sort key: task, then metric with numbers compared as numbers (recall@5 < recall@10)."""
    head, metric = split_key(key)
    return head, [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", metric)]


def _fmt(metric: str, v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if any(f in metric for f in FRACTIONS):
        return f"{100 * v:.2f}"
    return f"{v:.4g}"


def markdown_table(results: dict) -> str:
    """One row per (task/dataset, metric), one column per method; fractions shown in %."""
    methods = _by_method(results)
    names = list(methods)
    keys = sorted({k for r in methods.values() for k in r}, key=_natural)
    lines = [
        "| task | metric | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for k in keys:
        head, metric = split_key(k)
        unit = " (%)" if any(f in metric for f in FRACTIONS) else ""
        cells = [_fmt(metric, methods[n].get(k, float("nan"))) for n in names]
        lines.append(f"| {head} | {metric}{unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json`` and ``results.md`` under ``out_dir``.

    ``results`` is either one method's flat ``{key: value}`` or ``{method: {key: value}}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = _by_method(results)
    js, md = out / "results.json", out / "results.md"
    js.write_text(json.dumps(methods, indent=2, sort_keys=True))
    md.write_text("# finegrain evaluation\n\n" + markdown_table(methods))
    return {"json": js, "markdown": md}
