"""The benchmark's outputs: ``results.json`` (every number, per seed and averaged),
``report.md`` (machine, versions, command, budget, time per method, claims table, results
table, figures) and the PNG figures."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

from finegrain.bench.claims import NEAR_CHANCE, check_claims
from finegrain.bench.tasks import task_specs
from finegrain.eval.report import FRACTIONS

MAX_DATA_SHARE = 0.15


def machine() -> dict[str, Any]:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}  # fmt: skip
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("finegrain", "torch", "torchvision", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def metrics_by_method(runs: list[Any]) -> tuple[dict, dict]:
    """({method: {task/metric: mean over seeds}}, {method: [{task/metric: v} per seed]});
    tasks a method cannot do appear as the string 'n/a ...'."""
    per_seed: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        flat: dict[str, Any] = {}
        for key, res in r.results.items():
            if res.na:
                flat[key] = res.na
            flat.update({f"{key}/{m}": v for m, v in res.metrics.items()})
        per_seed.setdefault(r.method, []).append(flat)
    means: dict[str, dict[str, Any]] = {}
    for m, seeds in per_seed.items():
        means[m] = {k: (_mean([s[k] for s in seeds]) if not isinstance(v, str) else v)
                    for k, v in seeds[0].items()}  # fmt: skip
    return means, per_seed


def _fmt(metric: str, v: Any) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" if any(f in metric for f in FRACTIONS) else f"{v:.3g}"


def protocol_cards(runs: list[Any]) -> dict[str, dict[str, Any]]:
    """The protocol card of each task (``finegrain.eval.protocol``), from the first run that
    evaluated it; the evaluation data are the same for every method and seed."""
    cards: dict[str, dict[str, Any]] = {}
    for r in runs:
        for key, res in r.results.items():
            if res.protocol and key not in cards:
                cards[key] = res.protocol
    return cards


def headline_table(
    means: dict[str, dict[str, Any]], cards: dict[str, dict[str, Any]] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per (task, headline metric) with its N (evaluation images)
    and chance level from the task's protocol card, one column per method."""
    methods = list(means)
    cards = cards or {}
    rows = []
    for spec in task_specs():
        card = cards.get(spec.key, {})
        for metric in spec.headline:
            cells = []
            for m in methods:
                v = means[m].get(f"{spec.key}/{metric}", means[m].get(spec.key, "-"))
                cells.append(_fmt(metric, v))
            chance = card.get("chance", {}).get(metric)
            proto = [
                str(card.get("n_images", "-")),
                "-" if chance is None else _fmt(metric, chance),
            ]
            if any(c != "-" and not (c.startswith("n/a") and "failed" not in c) for c in cells):
                rows.append([f"{spec.key} {_short(metric)}", *proto, *cells])
    return ["task (metric, %)", "N", "chance", *methods], rows


def _short(metric: str) -> str:
    return {"image_retrieval_recall@1": "T2I R@1", "text_retrieval_recall@1": "I2T R@1",
            "acc1": "top-1", "miou": "mIoU"}.get(metric, metric)  # fmt: skip


def _pct(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{100 * v:+.{digits}f}"


def claims_markdown(claims: list[dict[str, Any]]) -> str:
    """The claims table, in points with two decimals (a verdict is never read off a rounded
    number: it is taken on exact values, which results.json keeps)."""
    lines = ["| claim | verdict | method | CLIP | chance | difference (points) "
             "| 95% CI (paired bootstrap) | half-width | smallest effect of interest "
             "| seeds above it |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in claims:
        margin = f"{100 * c['margin']:.2f} ({c['margin_source']})" if "margin" in c else "-"
        if "diff" not in c:
            lines.append(
                f"| {c['claim']} | **{c['verdict']}** | - | - | - | - | - | - | {margin} | - |"
            )
            continue
        ci = "-" if c["ci_low"] is None else f"[{_pct(c['ci_low'])}, {_pct(c['ci_high'])}]"
        half = "-" if c.get("half_width") is None else f"{100 * c['half_width']:.2f}"
        spread = "" if c["seed_std"] is None else f" (± {100 * c['seed_std']:.2f} over seeds)"
        chance = "-" if c.get("chance") is None else f"{100 * c['chance']:.1f}"
        lines.append(f"| {c['claim']} | **{c['verdict']}** | {100 * c['value']:.2f} | "
                     f"{100 * c['baseline']:.2f} | {chance} | {_pct(c['diff'])}{spread} | {ci} | "
                     f"{half} | "
                     f"{margin} | {c['seeds_held']}/{c['seeds']} |")  # fmt: skip
    notes = [f"- {c['claim']}: {c['note']}" for c in claims if c.get("note") and "diff" in c]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def sources_markdown(claims: list[dict[str, Any]]) -> str:
    """'Claims and where they come from': each claim row, its paper and where the paper makes
    it (or what this run uses as a proxy), and the region-level task without a claim."""
    lines = [f"- **{c['claim']}** ({c['paper']}): {c.get('source') or 'see the paper'}."
             for c in claims]  # fmt: skip
    lines.append(
        "- Compositional pairs (`compositional/pairs`) and the region tasks of the other methods "
        "are reported without a claim row: none of the four papers reports a compositional "
        "(SugarCrepe- or Winoground-style) result, and a claim a paper does not make is not "
        "tested here."
    )
    return "\n".join(lines) + "\n"


SPURIOUS_NOTE = (
    "Spurious-correlation scenes (`spurious`, a Waterbirds in miniature, "
    "`finegrain.data.synthetic_spurious`): a share of every method's training scenes "
    "(`spurious_share` of the budget) shows a circle or a square alone on a sandy or sea-blue "
    "background, the class's own tone in 95% of them; the test split balances the four "
    "class x tone groups. `spurious worst_group_acc` is the accuracy of the group a method does "
    "worst on (its chance: the expected minimum over the groups of a random scorer); "
    "`spurious top-1` the average. A method that reads the background instead of the shape "
    "drops on the groups where the two disagree.\n"
)


def median_half_width(claims: list[dict[str, Any]]) -> float | None:
    """Median 95%-interval half-width over the claims that have an interval (a fraction)."""
    hw = sorted(c["half_width"] for c in claims if c.get("half_width") is not None)
    if not hw:
        return None
    mid = len(hw) // 2
    return hw[mid] if len(hw) % 2 else (hw[mid - 1] + hw[mid]) / 2


def power_line(claims: list[dict[str, Any]]) -> str:
    m = median_half_width(claims)
    if m is None:
        return "Power: no claim has an interval in this run.\n"
    return (f"Power: median 95% half-width over the claims {100 * m:.2f} points (a difference "
            "smaller than its row's half-width cannot be told from 0 in this run; `--seeds N` "
            "and the `--full` tier narrow it).\n")  # fmt: skip


def _threads_line(d: dict[str, Any], mach: dict[str, Any]) -> str:
    jobs = d.get("jobs", 1)
    if d.get("budget", {}).get("device", "cpu") != "cpu":
        return f"{mach['torch_threads']} torch threads"
    return f"{jobs} job{'s' if jobs > 1 else ''} x 1 torch thread"


def _seeds_line(b: dict[str, Any], seeds: int) -> str:
    """How the training seeds differ (``data_seed``: one scene set, or one per seed)."""
    data_seed = b.get("data_seed", -1)
    if data_seed < 0:
        return ("Training seed s renders its own training scenes (scene seed s) and seeds the "
                "initialisation and batch order.")  # fmt: skip
    many = f" (the {seeds} seeds)" if seeds > 1 else ""
    return (f"Training seed s seeds the initialisation, batch order and views; every seed{many} "
            f"trains on the same training scenes (scene seed `data_seed` = {data_seed}), as a "
            "paper's seeds share its one dataset.")  # fmt: skip


def _cache_line(c: dict[str, Any] | None) -> str:
    if not c:
        return "not used"
    return (f"{c['images']} scenes, {c['mib']:.0f} MiB, {c['hits']} hits / {c['misses']} "
            "computations")  # fmt: skip


def timing_rows(runs: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        t = r.timing
        rows.append({"method": r.method, "seed": r.seed, **{k: round(v, 4) for k, v in t.items()},
                     "image_tower": r.towers.get("image", "")})  # fmt: skip
    return rows


def timing_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | seed | image tower | train (s) | train CPU (s) | samples/s | data wait (% of train) | eval (s) | eval CPU (s) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in rows:
        lines.append(f"| {t['method']} | {t['seed']} | {t['image_tower']} | {t['train_s']:.1f} | {t['train_cpu_s']:.1f} | "
                     f"{t['samples_per_s']:.1f} | {100 * t['data_share']:.1f} | {t['eval_s']:.1f} | {t.get('eval_cpu_s', 0):.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_outputs(opts: Any, runs: list[Any], wall: float, extra: dict[str, Any] | None = None,
                  figures_from: Path | None = None) -> Path:  # fmt: skip
    """Write results.json, report.md and the figures into ``opts.out``; returns report.md.

    Figures come from the first seed's runs (their figure material); ``figures_from``: a
    report folder whose figures (all but the results table, redrawn here) are copied instead,
    for a merged report whose runs no longer hold figure material."""
    from finegrain.bench.figures import save_figures

    out = opts.out
    means, per_seed = metrics_by_method(runs)
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r.results)
    claims = check_claims(by_method)
    cards = protocol_cards(runs)
    table = headline_table(means, cards)
    first = min((r.seed for r in runs), default=0)
    figs = save_figures({r.method: r.figures for r in runs if r.seed == first}, table, out)
    if figures_from is not None:
        figs += copy_figures(figures_from, out, skip={p.name for p in figs})
    timing = timing_rows(runs)
    data = {"command": opts.command, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": machine(), "versions": versions(), "budget": opts.budget.describe(),
            "seeds": opts.seeds, "seed_list": sorted({r.seed for r in runs}),
            "methods": opts.methods, "metrics": means,
            "per_seed": per_seed, "claims": claims, "timing": timing, "wall_s": round(wall, 2),
            "protocol": cards, **(extra or {}),
            "figures": [p.name for p in figs]}  # fmt: skip
    (out / "results.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    report = out / "report.md"
    report.write_text(render_markdown(data, table, figs))
    return report


def copy_figures(src: Path, out: Path, skip: set[str]) -> list[Path]:
    """The PNG figures that ``src``'s report lists (except ``skip``), copied into ``out``
    (another folder: ``merge_reports`` refuses an ``out`` that is one of its inputs)."""
    import shutil

    names = json.loads((src / "results.json").read_text()).get("figures", [])
    paths = []
    for name in names:
        if name in skip or not (src / name).is_file():
            continue
        shutil.copyfile(src / name, out / name)
        paths.append(out / name)
    return paths


def _merged_line(d: dict[str, Any]) -> str:
    parts = d.get("merged_from")
    if not parts:
        return ""
    rows = [f"`{p['command']}` (seeds {', '.join(map(str, p['seeds']))}; {p['date']}; "
            f"{p['wall_s'] / 60:.1f} min wall; {p['machine']})" for p in parts]  # fmt: skip
    return (f"Merged from {len(parts)} runs of the same budget (the wall and CPU time above are "
            "their sums): " + "; ".join(rows) + "  \n")  # fmt: skip


def render_markdown(d: dict[str, Any], table: tuple[list[str], list[list[str]]], figs: list[Path]
                    ) -> str:  # fmt: skip
    b, mach = d["budget"], d["machine"]
    worst = max((t["data_share"] for t in d["timing"]), default=0.0)
    share_note = "within" if worst <= MAX_DATA_SHARE else "ABOVE"
    header, rows = table
    results = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    results += ["| " + " | ".join(r) + " |" for r in rows]
    parts = [
        "# finegrain demo: every method on the built-in scenes\n",
        f"Command: `{d['command']}`  \nDate: {d['date']}  \nWall time: {d['wall_s'] / 60:.1f} min  \n"
        f"Machine: {mach['cpu']}, {mach['cores']} cores ({_threads_line(d, mach)}), "
        f"load average {mach.get('load_average_at_end', '?')} at the end  \n"
        "Versions: " + ", ".join(f"{k} {v}" for k, v in d["versions"].items()) + "  \n"
        f"CPU time: {d.get('cpu_s', 0) / 60:.1f} min (all processes and threads)  \n"
        + _merged_line(d),
        "## Claims of the papers\n",
        power_line(d["claims"]),
        "Each row: the method minus CLIP on the same evaluation images, in percentage points; "
        "95% interval from a paired bootstrap over the images (1000 draws; with several seeds each "
        "draw also resamples the seeds, so the interval pools images and seeds); half-width = half its "
        "length (about the smallest difference this run can detect); chance = a uniform random "
        "scorer's expected value on the task (a row where both methods score under "
        f"{NEAR_CHANCE:g}x chance is flagged below the table). Each claim's smallest effect "
        "of interest m: `held` = the whole interval above m; `equivalent` = inside (-m, m); "
        "`did not hold` = the whole interval below 0 (and not inside (-m, m)); `inconclusive` = "
        "anything else (e.g. above 0 but not above m); `tie (identical per-image values)` = both "
        "methods gave the same value on every image. Exact values are in results.json.\n",
        claims_markdown(d["claims"]),
        "## Claims and where they come from\n",
        sources_markdown(d["claims"]),
        "## Results (mean over seeds; n/a = the method cannot do the task)\n",
        "\n".join(results) + "\n",
        f"{b['eval_images']} held-out scenes per task (seeds disjoint from training); N = images "
        "scored, chance = a uniform random scorer's expected value (finegrain.eval.protocol). "
        "`+conditioned` = text-conditioned scoring. Every metric of every task is in "
        "results.json, with the protocol card of each task (`protocol`). Region-level rows "
        "(`regions/*`, `hardneg/*`, `compositional/*`) score every box or caption pair of the "
        "images, N counts images; n/a = the method lacks what the task reads (dense features, "
        "region queries, text-conditioned scores).\n",
        SPURIOUS_NOTE,
        "## Time per method\n",
        timing_markdown(d["timing"]),
        f"Data pipeline (scene generation, transforms, tokenisation) share of training time: at "
        f"most {100 * worst:.1f}% ({share_note} the 15% budget): the time each step waited for "
        "its batch, measured around the loader (scenes are rendered once and kept; with one job "
        "a loader worker makes the batches in parallel with the step, with several each job "
        "makes its own between steps).\n",
        "## Shared budget (identical for every method, never tuned on the evaluation splits)\n",
        "| "
        + " | ".join(b)
        + " |\n|"
        + "---|" * len(b)
        + "\n| "
        + " | ".join(str(v) for v in b.values())
        + " |\n",
        "Image tower: the hybrid tower (`image.name=hybrid`): the ImageNet-pretrained "
        "EfficientNet-Lite0 shipped on PyPI up to output stride `patch_size`, frozen, its output "
        "computed once per scene for all methods (training scenes in the parent, inherited by "
        "every job; evaluation scenes once per job; shared bottom cache: "
        f"{_cache_line(d.get('bottom_cache'))}), then a small transformer with a class token "
        "trained over its feature-map tokens (`image_width`, `image_depth`, `image_heads`); the "
        "timing table names the tower each method used. Text tower: a tiny transformer from "
        "scratch. AdamW, linear warmup then cosine decay. Method-specific settings come from each "
        "method's `<name>_smoke` recipe. " + _seeds_line(b, d.get("seeds", 1)) + "\n",
        "## Figures\n",
        "\n".join(f"![{p.stem}]({p.name})" for p in figs) + "\n",
    ]
    return "\n".join(parts)
