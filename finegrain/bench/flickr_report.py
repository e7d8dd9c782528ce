"""The Flickr8k suite's outputs (``finegrain.bench.flickr``): ``results.json``, ``report.md``
(machine, command, budget, results with N, chance and 95% intervals, the claims with a paired
bootstrap over test images, time per method) and retrieval-example PNGs. The statistics are the
scenes benchmark's (``finegrain.bench.claims``): same bootstrap, same verdict rules."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from finegrain.bench.claims import (
    BASELINE,
    Claim,
    check_claim,
    identical,
    paired_interval,
    statistic,
    verdict,
)
from finegrain.bench.report import claims_markdown, machine, timing_markdown, versions

T2I, I2T = "image_retrieval_recall@1", "text_retrieval_recall@1"
CLAIMS = (
    Claim("flair", "retrieval", T2I, "FLAIR > CLIP on text-to-image retrieval (R@1)",
          "Xiao et al. 2025, Sec. 4, zero-shot retrieval tables"),
    Claim("flair", "retrieval", I2T, "FLAIR > CLIP on image-to-text retrieval (R@1)",
          "Xiao et al. 2025, Sec. 4, zero-shot retrieval tables"),
    Claim("clippy", "retrieval", T2I, "CLIPpy >= CLIP on text-to-image retrieval (R@1): "
          "grouping does not cost retrieval", "Ranasinghe et al. 2023, Sec. 4"),
    Claim("detailclip", "retrieval", T2I, "DetailCLIP >= CLIP on text-to-image retrieval (R@1): "
          "the detail objectives do not cost retrieval", "Monsefi et al. 2024, Sec. 4"),
)  # fmt: skip
NON_INFERIORITY = ("clippy", "detailclip")  # ">=" claims: held when lo > -margin


def chance(metric: str, k: int, images: int, texts: int) -> float:
    """R@k of random scores: text->image has 1 right image of ``images``; image->text has
    ``texts / images`` right captions of ``texts`` (at least one in the top k)."""
    if metric.startswith("image_retrieval"):
        return min(1.0, k / images)
    right = texts // images
    miss = math.prod((texts - right - j) / (texts - j) for j in range(k))
    return 1.0 - miss


def interval(per: dict[str, Any], metric: str, draws: int = 1000, seed: int = 0) -> tuple:
    """95% percentile bootstrap interval of one method's metric over test-image resamples."""
    n = int(per[metric][1].max()) + 1
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (draws, n), generator=g)
    v = torch.tensor([statistic(per, metric, idx[k]) for k in range(draws)], dtype=torch.float64)
    q = torch.quantile(v, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(q[0]), float(q[1])


def non_inferiority(c: dict[str, Any]) -> dict[str, Any]:
    """A ">=" claim: held when the whole interval lies above -margin (not worse by an effect
    of interest); the strict verdict is kept beside it."""
    if c.get("ci_low") is None:
        return c
    strict = c["verdict"]
    ok = c["ci_low"] > -c["margin"]
    v = "held" if ok else ("did not hold" if c["ci_high"] < -c["margin"] else "inconclusive")
    return {**c, "verdict": f"{v} (non-inferiority; strict: {strict})"}


def conditioned_claim(by: dict[str, dict], draws: int) -> dict[str, Any]:
    """FLAIR's text-conditioned scoring > its global scoring, paired over the same images."""
    out = {"claim": "FLAIR conditioned > FLAIR global on text-to-image retrieval (R@1)",
           "paper": "Xiao et al. 2025, Sec. 3 (text-conditioned pooling) and its ablations",
           "method": "flair", "metric": T2I, "margin": 0.01,
           "margin_source": "convention: 1 point"}  # fmt: skip
    res = by.get("flair", {})
    g, c = res.get("retrieval"), res.get("retrieval+conditioned")
    if g is None or c is None or g.na or c.na:
        return {**out, "verdict": "not run"}
    lo, hi = paired_interval([(c, g)], T2I, draws)
    tie = identical(c.per_image, g.per_image, T2I)
    value, base = c.metrics[T2I], g.metrics[T2I]
    return {**out, "value": value, "baseline": base, "diff": value - base, "seeds": 1,
            "seeds_held": int(value - base > 0.01), "seed_std": None, "ci_low": lo,
            "ci_high": hi, "half_width": (hi - lo) / 2,
            "verdict": verdict(lo, hi, 0.01, tie)}  # fmt: skip


def all_claims(runs: list[Any], draws: int = 1000) -> list[dict[str, Any]]:
    by = {r.method: r.results for r in runs}
    nested = {m: [res] for m, res in by.items() if res.get("retrieval") and not res["retrieval"].na}
    out = []
    for claim in CLAIMS:
        c = check_claim(claim, nested, draws)
        out.append(non_inferiority(c) if claim.method in NON_INFERIORITY else c)
    out.insert(2, conditioned_claim(by, draws))
    return out


def result_rows(runs: list[Any], draws: int = 1000) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        for key in ("retrieval", "retrieval+conditioned"):
            res = r.results.get(key)
            if res is None:
                continue
            scoring = "conditioned" if key.endswith("conditioned") else "global"
            row: dict[str, Any] = {"method": r.method, "scoring": scoring}
            if res.na:
                rows.append({**row, "na": res.na})
                continue
            row.update(res.metrics, **res.protocol)
            for metric in (T2I, I2T):
                row[f"{metric}_ci"] = interval(res.per_image, metric, draws)
                values, owner = res.per_image[metric]  # kept for paired comparisons later
                row[f"{metric}_per_item"] = [values.tolist(), owner.tolist()]
            rows.append(row)
    return rows


def _cell(row: dict[str, Any], metric: str, k: int) -> str:
    name = metric.replace("@1", f"@{k}")
    v = row.get(name)
    if v is None:
        return "-"
    s = f"{100 * v:.1f}"
    if k == 1:
        lo, hi = row[f"{metric}_ci"]
        s += f" [{100 * lo:.1f}, {100 * hi:.1f}]"
    return s


def results_markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| method | scoring | T2I R@1 [95% CI] | R@5 | R@10 | I2T R@1 [95% CI] | R@5 | R@10 "
            "| N images / captions |\n|---|---|---|---|---|---|---|---|---|\n")  # fmt: skip
    lines, n = [], None
    for r in rows:
        if "na" in r:
            if r["scoring"] == "global":
                lines.append(f"| {r['method']} | - | {r['na']} | | | | | | |")
            continue
        n = (r["images"], r["texts"])
        cells = [_cell(r, m, k) for m in (T2I, I2T) for k in (1, 5, 10)]
        lines.append(f"| {r['method']} | {r['scoring']} | " + " | ".join(cells)
                     + f" | {r['images']} / {r['texts']} |")  # fmt: skip
    if n is not None:
        ch = [f"{100 * chance(m, k, *n):.2f}" for m in (T2I, I2T) for k in (1, 5, 10)]
        lines.append("| *chance* | | " + " | ".join(ch) + f" | {n[0]} / {n[1]} |")
    return head + "\n".join(lines) + "\n"


def save_examples(runs: list[Any], out: Path) -> list[Path]:
    from finegrain.bench.figures import save_retrieval

    paths = []
    for r in runs:
        key = "retrieval+conditioned" if "retrieval+conditioned" in r.figures else "retrieval"
        fig = r.figures.get(key)
        if fig is None:
            continue
        paths.append(save_retrieval(r.method, {**fig, "scoring": key},
                                    out / f"retrieval_{r.method}.png"))  # fmt: skip
    return paths


def write_report(opts: Any, runs: list[Any], wall: float, extra: dict[str, Any]) -> Path:
    """Write results.json, report.md and the PNGs into ``opts.out``; returns report.md."""
    out = opts.out
    rows = result_rows(runs)
    claims = [] if extra.get("ablation") else all_claims(runs)
    for r in runs:
        t = r.timing
        if "train_s" in t:
            t["samples_per_s"] = t["steps"] * opts.budget.batch_size / max(t["train_s"], 1e-9)
            t["data_share"] = t["data_wait_s"] / max(t["train_s"], 1e-9)
    timing = [{"method": r.method, "seed": 0, "image_tower": r.towers.get("image", ""), **r.timing}
              for r in runs if "train_s" in r.timing]  # fmt: skip
    d = {"command": opts.command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "machine": machine(), "versions": versions(), "budget": opts.budget.describe(),
         "data": str(opts.data), "wall_s": round(wall, 1), **extra, "results": rows,
         "claims": claims, "timing": timing}  # fmt: skip
    (out / "results.json").write_text(json.dumps(d, indent=1, default=str) + "\n")
    figs = save_examples(runs, out)
    md = render(d, rows, claims, timing, figs)
    (out / "report.md").write_text(md, encoding="utf-8")
    return out / "report.md"


def render(d: dict[str, Any], rows: list, claims: list, timing: list, figs: list[Path]) -> str:
    m, b = d["machine"], d["budget"]
    cache = d.get("image_cache", {}), d.get("text_cache", {})
    lines = [
        "# finegrain demo --suite flickr8k: every method on Flickr8k\n",
        f"Command: `{d['command']}`  \nDate: {d['date']}; machine: {m['cpu']}, {m['cores']} "
        f"cores, {m['torch_threads']} torch threads, load average {m.get('load_average_at_end')} "
        f"at the end; wall {d['wall_s'] / 60:.1f} min, CPU {d['cpu_s'] / 60:.1f} min "
        f"(frozen-bottom caches {d.get('cache_s', 0):.0f} s, {d.get('cache_cpu_s', 0):.0f} CPU s).\n",
        f"Budget (every method): `{json.dumps(b)}`. Test split: Flickr8k test, N below; "
        "95% intervals: percentile bootstrap over test images (1,000 draws; a caption goes with "
        "its image).\n",
        "## Results (%, Flickr8k test)\n", results_markdown(rows),
        *(["\n## Claims (paired bootstrap over test images; CLIP = global scoring, FLAIR = its "
           "paper's text-conditioned scoring)\n", claims_markdown(claims)] if claims else []),
        "\n## Time per method\n", timing_markdown(timing) if timing else "none\n",
        f"\nShared caches: image bottom {cache[0]}; text prefix {cache[1]}. GRAIN: "
        f"{d.get('regions')}.\n",
    ]  # fmt: skip
    if figs:
        lines.append("\n## Retrieval examples (3 caption queries, top 5 images)\n")
        lines += [f"![{p.stem}]({p.name})\n" for p in figs]
    return "\n".join(lines)


__all__ = ["BASELINE", "write_report"]


# ---- FLAIR's ablation (a second run with ``--ablation``), merged into the suite's report -------
# FLAIR's ablation (``--ablation``), same budget; the suite's FLAIR is the reference row.
# Ordered by what it isolates first: each loss alone, then the sub-caption count and pool.
ABLATION = (
    ("mps_only", "MPS loss only (global image vs K sub-captions; no text-conditioned loss)",
     {"add_tcs_loss": False}),
    ("tcs_only", "TCS loss only (text-conditioned; released --add-mps-loss off)",
     {"add_mps_loss": False}),
    ("k1", "K = 1 sub-caption", {"num_subcaptions": 1}),
    ("pool2", "sub-captions of 1..2 merged captions (flair_flickr8k's pool)", {"max_sentences": 2}),
    ("k2", "K = 2 sub-captions", {"num_subcaptions": 2}),
    ("k5", "K = 5 sub-captions (every caption)", {"num_subcaptions": 5}),
)  # fmt: skip
ABLATION_LABELS = {"flair": "FLAIR as in the suite (TCS + MPS, K = 4 sub-captions of 1 caption)"}


def _per(row: dict[str, Any], metric: str) -> dict[str, Any]:
    values, owner = row[f"{metric}_per_item"]
    return {metric: (torch.tensor(values, dtype=torch.float64), torch.tensor(owner))}


def _best(rows: list[dict[str, Any]], method: str) -> dict[str, dict[str, Any]]:
    return {r["scoring"]: r for r in rows if r["method"] == method and "na" not in r}


def ablation_markdown(suite: dict[str, Any], ablation: dict[str, Any], draws: int = 1000) -> str:
    """Each variant's test R@1 (global / conditioned) and its paired difference from the suite's
    FLAIR on the same test images (conditioned scoring where both have it)."""
    labels = {**ABLATION_LABELS, **{f"flair_{k}": what for k, what, _ in ABLATION}}
    ref = _best(suite["results"], "flair")
    clip = _best(suite["results"], "clip").get("global")
    lines = ["| variant | T2I R@1 global | T2I R@1 conditioned | I2T R@1 global | I2T R@1 "
             "conditioned | T2I R@1 vs the suite's FLAIR (conditioned; 95% CI) | train CPU (s) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    cpu = {t["method"]: t.get("train_cpu_s") for t in suite["timing"] + ablation["timing"]}
    methods = ["flair"] + [k for k in labels if k != "flair"]
    rows = {"flair": ref, **{m: _best(ablation["results"], m) for m in methods[1:]}}
    for m in methods:
        got = rows.get(m) or {}
        if not got:
            continue
        cells = [f"{100 * got[s][k]:.1f}" if s in got else "-"
                 for k in (T2I, I2T) for s in ("global", "conditioned")]  # fmt: skip
        diff = "reference"
        if m != "flair" and "conditioned" in got and "conditioned" in ref:
            a, b = _per(got["conditioned"], T2I), _per(ref["conditioned"], T2I)
            lo, hi = paired_interval([(_Res(a), _Res(b))], T2I, draws)
            d = got["conditioned"][T2I] - ref["conditioned"][T2I]
            diff = f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        c = cpu.get(m)
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + f" | {diff} | "
                     + ("-" if c is None else f"{c:.0f}") + " |")  # fmt: skip
    if clip:
        lines.append(f"| *CLIP (suite), global* | {100 * clip[T2I]:.1f} | - | {100 * clip[I2T]:.1f}"
                     " | - | | |")  # fmt: skip
    return "\n".join(lines) + "\n"


class _Res:  # what paired_interval reads from a task result
    def __init__(self, per: dict[str, Any]) -> None:
        self.per_image = per


def publish(suite_dir: Path, ablation_dir: Path | None, out: Path) -> Path:
    """Copy the suite's report and PNGs to ``out`` (docs/flickr8k), the ablation's table
    appended, and results.json without the per-image lists (kept in the run folders)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    suite = json.loads((suite_dir / "results.json").read_text())
    md = (suite_dir / "report.md").read_text(encoding="utf-8")
    lean = {**suite, "results": [{k: v for k, v in r.items() if not k.endswith("_per_item")}
                                 for r in suite["results"]]}  # fmt: skip
    if ablation_dir is not None and (ablation_dir / "results.json").is_file():
        abl = json.loads((ablation_dir / "results.json").read_text())
        a, b = abl.get("budget", {}), suite.get("budget", {})
        odd = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if odd:  # its paired differences are against the suite's FLAIR: same budget only
            raise ValueError(f"{ablation_dir} was trained on another budget than {suite_dir} "
                             f"({', '.join(f'{k}: {a.get(k)} vs {b.get(k)}' for k in odd)}); "
                             "run the ablation with the suite's options")  # fmt: skip
        md += (
            "\n## FLAIR ablation (same budget, towers and caches; `--ablation`)\n\n"
            f"Command: `{abl['command']}`; {abl['date']}.\n\n" + ablation_markdown(suite, abl)
        )
        lean["ablation"] = {**abl, "results": [{k: v for k, v in r.items()
                                                if not k.endswith("_per_item")}
                                               for r in abl["results"]]}  # fmt: skip
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(lean, indent=1, default=str) + "\n")
    for png in suite_dir.glob("*.png"):
        shutil.copy(png, out / png.name)
    return out / "report.md"


if __name__ == "__main__":  # python -m finegrain.bench.flickr_report SUITE [ABLATION] OUT
    import sys

    a = [Path(p) for p in sys.argv[1:]]
    print(publish(a[0], a[1] if len(a) == 3 else None, a[-1]))
