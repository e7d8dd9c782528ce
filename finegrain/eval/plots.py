"""Evaluation figures (matplotlib, Agg backend): segmentation overlays, text-conditioned
attention maps and retrieval example grids, saved as PNG."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from finegrain.eval.common import EvalContext, eval_transform, tokenize  # noqa: E402
from finegrain.eval.containers import ImageItem, load_image  # noqa: E402
from finegrain.eval.task import task_object  # noqa: E402


def _show(ax: Any, img: Any, title: str = "") -> None:
    ax.imshow(img)
    ax.set_title(textwrap.fill(title[:60], 26), fontsize=6)
    ax.axis("off")


def _color(mask: np.ndarray, n: int) -> np.ndarray:
    """(H, W) labels -> (H, W, 4) RGBA, background transparent."""
    cmap = plt.get_cmap("tab20", max(n, 2))
    rgba = cmap(mask % max(n, 2))
    rgba[..., 3] = np.where((mask == 0) | (mask == 255), 0.0, 0.55)
    return rgba


def save_segmentation_overlays(
    images: list[ImageItem],
    preds: list[np.ndarray],
    masks: list[np.ndarray],
    classnames: list[str],
    out_dir: Path,
) -> list[Path]:
    """One PNG per image: the image, ground truth and prediction overlaid on it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (im, p, g) in enumerate(zip(images, preds, masks)):
        img = np.asarray(load_image(im).resize((g.shape[1], g.shape[0])))
        fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.7))
        _show(axes[0], img, "image")
        for ax, lab, name in ((axes[1], g, "ground truth"), (axes[2], p, "prediction")):
            _show(ax, img, name)
            ax.imshow(_color(lab.astype(np.int64), len(classnames) + 1))
        present = sorted({int(v) for v in np.unique(p)} - {0, 255})
        fig.suptitle(
            ", ".join(classnames[v - 1] for v in present if v <= len(classnames))[:90], fontsize=7
        )
        path = out_dir / f"overlay_{i:03d}.png"
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def save_retrieval_grid(
    images: list[ImageItem],
    texts: list[str],
    scores: torch.Tensor,
    text_to_image: list[int],
    path: Path,
    num_queries: int = 4,
    top: int = 5,
) -> Path:
    """Rows = text queries, columns = their top images (ground truth titled with a '*')."""
    path.parent.mkdir(parents=True, exist_ok=True)
    q = min(num_queries, len(texts))
    top = min(top, len(images))
    fig, axes = plt.subplots(q, top, figsize=(1.6 * top, 1.8 * q), squeeze=False)
    for r in range(q):
        order = scores[:, r].argsort(descending=True, stable=True)[:top].tolist()
        for c, i in enumerate(order):
            mark = "* " if i == text_to_image[r] else ""
            _show(axes[r, c], load_image(images[i]), f"{mark}#{c + 1} {scores[i, r]:.2f}")
        axes[r, 0].set_ylabel(texts[r][:30], fontsize=6)
        axes[r, 0].set_title(f"{texts[r][:38]}\n" + axes[r, 0].get_title(), fontsize=6)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


@torch.no_grad()
def attention_maps(
    ctx: EvalContext, images: list[ImageItem], texts: list[str]
) -> torch.Tensor | None:
    """(Ni, Nt, h, w) text-conditioned attention over patches: the method's own
    ``attention_maps(images, tokens)`` when it has one (e.g. FLAIR's pooling weights), else
    the softmax over patches of <dense feature, text embedding> / 0.07; None without either."""
    m = ctx.method
    tf = eval_transform(ctx.image_size, ctx.mean, ctx.std)
    batch = torch.stack([tf(load_image(im)) for im in images]).to(ctx.device)
    tokens = tokenize(ctx, texts).to(ctx.device)
    if "attention_maps" in m.capabilities():
        return m.attention_maps(batch, tokens).float().cpu()
    if "dense_features" not in m.capabilities():
        return None
    dense = F.normalize(m.dense_features(batch).float(), dim=1)  # (Ni, D, h, w)
    txt = F.normalize(m.encode_text(tokens).float(), dim=-1)  # (Nt, D)
    sim = torch.einsum("idhw,td->ithw", dense, txt)
    ni, nt, h, w = sim.shape
    return (sim.reshape(ni, nt, h * w) / 0.07).softmax(-1).reshape(ni, nt, h, w).cpu()


def save_attention_maps(
    ctx: EvalContext, images: list[ImageItem], texts: list[str], path: Path
) -> Path | None:
    """Grid: rows = images, columns = texts, each the image with the text's attention map."""
    maps = attention_maps(ctx, images, texts)
    if maps is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    ni, nt = maps.shape[:2]
    fig, axes = plt.subplots(ni, nt, figsize=(1.8 * nt, 1.8 * ni), squeeze=False)
    for i in range(ni):
        img = np.asarray(load_image(images[i]).resize((ctx.image_size, ctx.image_size)))
        for t in range(nt):
            heat = F.interpolate(
                maps[i, t][None, None], size=img.shape[:2], mode="bilinear", align_corners=False
            )[0, 0].numpy()
            _show(axes[i, t], img, texts[t])
            axes[i, t].imshow(heat, cmap="jet", alpha=0.45)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def save_task_plots(
    ctx: EvalContext, task: str, data: Any, art: dict, out_dir: Path, num: int
) -> list[Path]:
    """The figures of one task under ``out_dir`` (drawn by its task object)."""
    obj = task_object(task)
    return [] if num <= 0 or obj is None else obj.plots(ctx, data, art, out_dir, num)


def segmentation_plots(ctx: EvalContext, data: Any, art: dict, out_dir: Path, num: int) -> list:
    """Overlays of predicted and true masks (the segmentation task's figures)."""
    imgs = [data.images[i] for i in art["indices"]]
    return save_segmentation_overlays(
        imgs, art["preds"], art["masks"], data.classnames, out_dir / "overlays"
    )


def retrieval_plots(ctx: EvalContext, data: Any, art: dict, out_dir: Path, num: int) -> list:
    """A grid of retrieved images and, where the method has them, attention maps."""
    grid = save_retrieval_grid(data.images, data.texts, art["scores"], data.text_to_image,
                               out_dir / "retrieval_examples.png", num)  # fmt: skip
    firsts = [data.text_to_image.index(i) for i in range(min(num, len(data.images)))]
    att = save_attention_maps(ctx, data.images[: len(firsts)], [data.texts[j] for j in firsts],
                              out_dir / "attention_maps.png")  # fmt: skip
    return [grid] + ([att] if att else [])
