"""Results as JSON (flat CLIP_benchmark-compatible metric names) and a Markdown table across
methods and tasks."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

# Metrics shown as percentages in the Markdown table (stored as fractions in JSON, like
# CLIP_benchmark).
FRACTIONS = ("recall@", "acc1", "acc5", "mean_per_class_recall", "miou", "pixel_accuracy",
             "acc", "text_score", "image_score", "group_score")  # fmt: skip


def _by_method(results: dict) -> dict[str, dict[str, float]]:
    if results and all(isinstance(v, dict) for v in results.values()):
        return {str(k): dict(v) for k, v in results.items()}
    return {"model": dict(results)}


def _cards_by_method(protocols: dict | None) -> dict[str, dict[str, dict]]:
    """``{method: {prefix: card}}`` from that or one method's ``{prefix: card}``."""
    if not protocols:
        return {}
    if all(isinstance(v, dict) and "task" in v for v in protocols.values()):
        return {"model": dict(protocols)}
    return {str(k): dict(v) for k, v in protocols.items()}


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


def _card(cards: dict[str, dict[str, dict]], head: str) -> dict:
    """The protocol card of task prefix ``head`` (the first method's that has one)."""
    for per_method in cards.values():
        if head in per_method:
            return per_method[head]
    return {}


GROUP_SCORES = ("text_score", "image_score", "group_score")  # Winoground-style 2x2 groups


def _units(card: dict, metric: str) -> int | None:
    """What ``metric`` averages over besides images: its groups (a group score, per tag where
    the card counts them), its kind's pairs (``acc_<kind>``), else texts / regions / boxes /
    pairs; None for image-only tasks."""
    if "n_groups" in card and metric.startswith(GROUP_SCORES):
        tag = metric.partition("_score")[2].lstrip("_")
        return (card.get("n_groups_per_tag") or {}).get(tag, card["n_groups"])
    kind = metric.removeprefix("acc_") if metric.startswith("acc_") else ""
    if kind in (card.get("n_pairs_per_kind") or {}):
        return card["n_pairs_per_kind"][kind]
    keys = ("n_texts", "n_regions", "n_boxes", "n_pairs")
    return next((card[k] for k in keys if k in card), None)


def _count(card: dict, metric: str = "") -> str:
    """'256', or '1000 / 5000' (images / texts, regions, boxes, pairs or groups), from a
    protocol card; '' without one."""
    n = card.get("n_images")
    extra = _units(card, metric)
    if n is None:
        return "" if extra is None else str(extra)
    return f"{n}" if extra is None else f"{n} / {extra}"


def markdown_table(results: dict, protocols: dict | None = None) -> str:
    """One row per (task/dataset, metric), one column per method; fractions shown in %.
    With protocol cards (``finegrain.eval.protocol``), N (images, or images / the texts,
    regions, boxes, pairs or groups the metric averages over) and the chance level of each
    metric are shown next to the metric."""
    methods = _by_method(results)
    cards = _cards_by_method(protocols)
    names = list(methods)
    keys = sorted({k for r in methods.values() for k in r}, key=_natural)
    extra = " N | chance |" if cards else ""
    lines = [
        f"| task | metric |{extra} " + " | ".join(names) + " |",
        "|---|---|" + ("---|---|" if cards else "") + "---|" * len(names),
    ]
    for k in keys:
        head, metric = split_key(k)
        unit = " (%)" if any(f in metric for f in FRACTIONS) else ""
        cells = [_fmt(metric, methods[n].get(k, float("nan"))) for n in names]
        proto = ""
        if cards:
            card = _card(cards, head)
            chance = card.get("chance", {}).get(metric)
            proto = f" {_count(card, metric)} | {'' if chance is None else _fmt(metric, chance)} |"
        lines.append(f"| {head} | {metric}{unit} |{proto} " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def failed_lines(failed: dict[str, dict[str, str]] | None) -> list[str]:
    """'task <prefix> failed (<method>): <reason>', one line per failed task."""
    return [
        f"task {prefix} failed ({method}): {reason}"
        for method, per in (failed or {}).items()
        for prefix, reason in per.items()
    ]


def write_report(
    results: dict,
    out_dir: str | Path,
    protocols: dict | None = None,
    failed: dict[str, dict[str, str]] | None = None,
) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and (with cards) ``protocol.json`` under ``out_dir``.

    ``results`` is either one method's flat ``{key: value}`` or ``{method: {key: value}}``
    (CLIP_benchmark metric names, unchanged for existing readers); ``protocols`` the same
    shape with the protocol card of each task prefix (``finegrain.eval.protocol``);
    ``failed`` ``{method: {prefix: reason}}`` of the tasks that gave no result, written to
    ``failed.json`` and listed under the table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = _by_method(results)
    cards = _cards_by_method(protocols)
    js, md = out / "results.json", out / "results.md"
    js.write_text(json.dumps(methods, indent=2, sort_keys=True))
    paths = {"json": js, "markdown": md}
    if cards:
        paths["protocol"] = out / "protocol.json"
        paths["protocol"].write_text(json.dumps(cards, indent=2, sort_keys=True, default=str))
    text = "# finegrain evaluation\n\n" + markdown_table(methods, cards)
    lines = failed_lines(failed)
    if lines:
        paths["failed"] = out / "failed.json"
        kept = {m: per for m, per in (failed or {}).items() if per}
        paths["failed"].write_text(json.dumps(kept, indent=2, sort_keys=True))
        text += "\n## Failed tasks\n\n" + "".join(f"- {line}\n" for line in lines)
    md.write_text(text)
    return paths
