"""The benchmark's figures (matplotlib, Agg): results table, segmentation overlays of every
method on the same images, text-conditioned attention maps per (image, sentence) with the
matching pairs framed, predicted vs ground-truth boxes, retrieval examples with full captions.

``collect`` keeps the little each figure needs while a trained model is in memory;
``save_figures`` draws them after all methods ran.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finegrain.eval.containers import load_image
from finegrain.eval.plots import _color, attention_maps, plt  # Agg backend set there

NUM = 4  # images per figure
GOOD, BAD = "#1a9850", "#d73027"


def _native(key: str, figs: dict[str, Any]) -> bool:
    """Prefer a task's conditioned twin for retrieval examples when the method has it."""
    return key.endswith("+conditioned") or "retrieval" not in figs


def collect(ctx: Any, key: str, data: Any, art: dict, figs: dict[str, Any]) -> None:
    """Store what the figures of task ``key`` need from one method (seed 0)."""
    if key == "segmentation/zeroshot":
        figs["segmentation"] = {"images": [data.images[i] for i in art["indices"][:NUM]],
                                "preds": art["preds"][:NUM], "masks": art["masks"][:NUM],
                                "classnames": data.classnames}  # fmt: skip
    elif key.startswith("retrieval/sentences") and _native(key, figs):
        scores = art["scores"]  # (Ni, Nt)
        queries = list(range(0, len(data.texts), max(1, len(data.texts) // 3)))[:3]
        top = [scores[:, q].argsort(descending=True, stable=True)[:NUM].tolist() for q in queries]
        figs["retrieval"] = {"texts": [data.texts[q] for q in queries], "top": top,
                             "gt": [data.text_to_image[q] for q in queries],
                             "images": data.images, "scoring": key}  # fmt: skip
        if key == "retrieval/sentences":
            _attention(ctx, data, figs)
    elif key == "boxes":
        figs["boxes"] = art


def _attention(ctx: Any, data: Any, figs: dict[str, Any]) -> None:
    """(image, sentence) maps for 3 images x one sentence of each: methods with their own
    ``attention_maps`` (FLAIR's text-conditioned pooling) only."""
    if "attention_maps" not in ctx.method.capabilities():
        return
    first = [data.text_to_image.index(i) for i in range(3)]
    images, texts = data.images[:3], [data.texts[j] for j in first]
    figs["attention"] = {"images": images, "texts": texts,
                         "maps": attention_maps(ctx, images, texts).numpy()}  # fmt: skip


def _wrap(text: str, width: int = 28) -> str:
    return textwrap.fill(text, width)


def _frame(ax: Any, color: str, lw: float = 3.0) -> None:
    for s in ax.spines.values():
        s.set_edgecolor(color)
        s.set_linewidth(lw)
        s.set_visible(True)


def _img(ax: Any, im: Any, title: str = "", size: int = 0) -> np.ndarray:
    arr = load_image(im)
    arr = np.asarray(arr.resize((size, size)) if size else arr)
    ax.imshow(arr)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)
    return arr


def save_table(rows: list[list[str]], header: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * (len(header) - 1), 0.32 * (len(rows) + 2)))
    ax.axis("off")
    rows = [[c.split(" (")[0] if c.startswith("n/a") else c for c in r] for r in rows]
    t = ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="center")
    t.auto_set_font_size(False)
    t.set_fontsize(7)
    t.auto_set_column_width(col=list(range(len(header))))
    t.scale(1, 1.25)
    for (r, c), cell in t.get_celld().items():
        if r == 0:
            cell.set_facecolor("#dddddd")
        if c == 0:
            cell.set_text_props(ha="left")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def save_segmentation(figs: dict[str, dict], path: Path) -> Path | None:
    """Rows = the same images; columns = image, ground truth, one prediction per method."""
    have = {m: f["segmentation"] for m, f in figs.items() if "segmentation" in f}
    if not have:
        return None
    first = next(iter(have.values()))
    n, names = len(first["images"]), first["classnames"]
    fig, axes = plt.subplots(n, 2 + len(have), figsize=(1.5 * (2 + len(have)), 1.55 * n),
                             squeeze=False)  # fmt: skip
    for i in range(n):
        gt = first["masks"][i]
        img = _img(axes[i, 0], first["images"][i], "image" if i == 0 else "", gt.shape[0])
        _img(axes[i, 1], first["images"][i], "ground truth" if i == 0 else "", gt.shape[0])
        axes[i, 1].imshow(_color(gt.astype(np.int64), len(names) + 1))
        present = sorted({int(v) for v in np.unique(gt)} - {0, 255})
        axes[i, 0].set_ylabel(_wrap(", ".join(names[v - 1] for v in present), 16), fontsize=6)
        for j, (m, seg) in enumerate(have.items()):
            axes[i, 2 + j].imshow(img)
            axes[i, 2 + j].imshow(_color(seg["preds"][i].astype(np.int64), len(names) + 1))
            axes[i, 2 + j].set_xticks([])
            axes[i, 2 + j].set_yticks([])
            if i == 0:
                axes[i, 2 + j].set_title(m, fontsize=7)
    fig.suptitle("zero-shot segmentation (colour = predicted shape class)", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def save_attention(method: str, att: dict, path: Path) -> Path:
    """Rows = images, columns = sentences; the matching (image, sentence) pairs framed green."""
    maps, n = att["maps"], len(att["images"])
    fig, axes = plt.subplots(n, n, figsize=(2.0 * n, 2.1 * n), squeeze=False)
    for i in range(n):
        for t in range(n):
            arr = _img(axes[i, t], att["images"][i])
            heat = torch.nn.functional.interpolate(torch.tensor(maps[i, t])[None, None],
                                                   size=arr.shape[:2], mode="bilinear")[0, 0]  # fmt: skip
            axes[i, t].imshow(heat.numpy(), cmap="jet", alpha=0.45)
            _frame(axes[i, t], GOOD if i == t else "#bbbbbb", 3.5 if i == t else 0.8)
            if i == 0:
                axes[i, t].set_title(_wrap(att["texts"][t], 30), fontsize=6)
    fig.suptitle(f"{method}: text-conditioned attention, rows = images, columns = sentences "
                 "(green = the image the sentence describes)", fontsize=7)  # fmt: skip
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def save_boxes(method: str, box: dict, path: Path) -> Path:
    """Predicted boxes (dashed orange) vs ground truth (green) on the same scenes."""
    n = len(box["images"])
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.4), squeeze=False)
    for i in range(n):
        arr = _img(axes[0, i], box["images"][i])
        s = arr.shape[0]
        for b in box["gt"][i]:
            axes[0, i].add_patch(plt.Rectangle((b[0] * s, b[1] * s), (b[2] - b[0]) * s,
                                               (b[3] - b[1]) * s, fill=False, ec=GOOD, lw=2))  # fmt: skip
        for b in box["pred"][i].tolist():
            axes[0, i].add_patch(plt.Rectangle((b[0] * s, b[1] * s), (b[2] - b[0]) * s,
                                               (b[3] - b[1]) * s, fill=False, ec="orange",
                                               lw=1.2, ls="--"))  # fmt: skip
    fig.suptitle(f"{method}: predicted boxes (orange, dashed) vs ground truth (green)", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def save_retrieval(method: str, r: dict, path: Path) -> Path:
    """Rows = sentence queries (full text on the left); columns = top images, the correct
    one framed green (a red frame on the first column when it is missed)."""
    q, k = len(r["texts"]), len(r["top"][0])
    fig, axes = plt.subplots(q, k + 1, figsize=(1.6 * k + 2.6, 1.75 * q), squeeze=False,
                             gridspec_kw={"width_ratios": [1.9] + [1] * k})  # fmt: skip
    for i in range(q):
        axes[i, 0].axis("off")
        axes[i, 0].text(0, 0.5, _wrap(r["texts"][i], 30), fontsize=7, va="center")
        for j, idx in enumerate(r["top"][i]):
            _img(
                axes[i, j + 1],
                r["images"][idx],
                f"#{j + 1}" + (" (match)" if idx == r["gt"][i] else ""),
            )
            if idx == r["gt"][i]:
                _frame(axes[i, j + 1], GOOD)
        if r["gt"][i] not in r["top"][i]:
            _frame(axes[i, 1], BAD)
    fig.suptitle(f"{method}: sentence -> image retrieval ({r['scoring']})", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def save_figures(figs: dict[str, dict], table: tuple[list[str], list[list[str]]], out: Path
                 ) -> list[Path]:  # fmt: skip
    """All figures under ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [save_table(table[1], table[0], out / "results_table.png")]
    seg = save_segmentation(figs, out / "segmentation.png")
    paths += [seg] if seg else []
    for m, f in figs.items():
        if "attention" in f:
            paths.append(save_attention(m, f["attention"], out / f"attention_{m}.png"))
        if "boxes" in f:
            paths.append(save_boxes(m, f["boxes"], out / f"boxes_{m}.png"))
        if "retrieval" in f:
            paths.append(save_retrieval(m, f["retrieval"], out / f"retrieval_{m}.png"))
    return paths
