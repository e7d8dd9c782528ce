"""``finegrain predict``: zero-shot labels or embeddings for a folder / glob of images.

    finegrain predict --checkpoint runs/clip_smoke --images 'photos/*.jpg' \\
        --classes circle,square,triangle --top-k 3            # prints TSV: path, label, score
    finegrain predict --checkpoint hf:clip-dir --images photos/ --embeddings out.npy
    finegrain predict --checkpoint open_clip:ViT-B-16=w.pt --images photos/ --embeddings out.parquet

``--classes`` takes a comma-separated list or a text file (one class per line); ``--descriptions``
a JSON ``{class: [descriptor, ...]}`` (GRAIN-style prompts). Embeddings go to ``.npy`` (an
(N, E) float32 array; the image paths next to it in ``<name>.paths.txt``) or ``.parquet``
(columns ``path`` and ``embedding``; needs pyarrow). ``--out FILE`` writes the labels as TSV.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import torch

from finegrain.api import load
from finegrain.errors import run_subcommand

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def find_images(spec: str) -> list[Path]:
    """Image files of a folder (recursive) or a glob pattern, sorted."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in glob.glob(spec, recursive=True)]
        files = [p for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    if not files:
        raise ValueError(f"no images found at '{spec}' (a folder, a file or a glob; extensions {', '.join(IMAGE_EXTS)})")  # fmt: skip
    return sorted(files)


def read_classes(spec: str) -> list[str]:
    path = Path(spec).expanduser()
    names = path.read_text().splitlines() if path.is_file() else spec.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("--classes is empty")
    return names


def write_embeddings(emb: torch.Tensor, paths: list[Path], out: Path) -> None:
    import numpy as np

    arr = emb.float().cpu().numpy().astype(np.float32)  # (N, E)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, arr)
        out.with_suffix(".paths.txt").write_text("".join(f"{p}\n" for p in paths))
    elif out.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(
                "writing .parquet needs pyarrow (pip install pyarrow); or use .npy"
            ) from None
        table = pa.table({"path": [str(p) for p in paths], "embedding": list(arr)})
        pq.write_table(table, out)
    else:
        raise ValueError(f"--embeddings must end in .npy or .parquet, got '{out.name}'")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finegrain predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_SPEC",
                   help="run dir (or a demo folder holding one run), checkpoint, or "
                   "open_clip:MODEL=FILE | hf:DIR | flair:FILE")  # fmt: skip
    p.add_argument("--images", required=True, help="image folder, file or glob ('a/*.jpg')")
    p.add_argument("--classes", default="", help="comma-separated class names or a text file")
    p.add_argument("--descriptions", default="", help="JSON {class: [descriptor, ...]}")
    p.add_argument(
        "--templates", default="plain", help="plain | default | a clip_benchmark set | file"
    )
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--embeddings", default="", metavar="OUT.npy|OUT.parquet")
    p.add_argument("--out", default="", help="write the labels as TSV here instead of stdout")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if bool(args.classes) == bool(args.embeddings):
        raise ValueError("give --classes (zero-shot labels) or --embeddings OUT (one of them)")
    if args.top_k < 1 or args.batch_size < 1:
        raise ValueError("--top-k and --batch-size must be >= 1")
    files = find_images(args.images)
    model, _ = load(args.checkpoint, device=args.device)
    classes = read_classes(args.classes) if args.classes else []
    desc = json.loads(Path(args.descriptions).read_text()) if args.descriptions else None
    rows, embs = [], []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=args.quiet)
    for i in range(0, len(files), args.batch_size):
        chunk = files[i : i + args.batch_size]
        if classes:
            probs = model.classify(chunk, classes, desc, args.templates)  # (B, C)
            top = probs.topk(min(args.top_k, len(classes)), dim=-1)
            for path, vals, idx in zip(
                chunk, top.values.tolist(), top.indices.tolist(), strict=True
            ):
                labels = "\t".join(f"{classes[j]}\t{v:.4f}" for v, j in zip(vals, idx, strict=True))
                rows.append(f"{path}\t{labels}")
        else:
            embs.append(model.encode_image(chunk).cpu())
        bar.update(len(chunk))
    bar.close()
    if embs:
        write_embeddings(torch.cat(embs), files, Path(args.embeddings))
        print(f"wrote {len(files)} embeddings to {args.embeddings}", file=sys.stderr)
    else:
        text = "".join(r + "\n" for r in rows)
        if args.out:
            Path(args.out).write_text(text)
        else:
            print(text, end="")
    return 0


def main(argv: list[str]) -> int:
    """Entry point of ``finegrain predict``; returns the exit code (2 for user mistakes)."""
    return run_subcommand("finegrain predict", build_parser(), run, argv)
