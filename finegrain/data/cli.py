"""``finegrain data convert | inspect | synthesize`` (dispatched from ``finegrain/cli.py``).

    finegrain data convert --manifest captions.jsonl --images DIR --out shards/ [--shard-size N]
    finegrain data convert --layout dreamlip --manifest cc3m_recap.csv --image-column image ...
    finegrain data inspect "shards/{00000..00009}.tar"    # or "shards/*.tar"
    finegrain data synthesize --out shards/ --num 10000 [--image-size 64 --seed 0]

Every command prints one JSON object on stdout; user mistakes print ``error: ...`` on stderr
and return 2. ``convert`` refuses a non-empty ``--out`` unless ``--overwrite`` (which deletes
the folder's old ``*.tar`` shards first, so splits never mix); it decodes every image and
skips broken rows, listing each with its manifest line and reason. ``inspect`` reports
truncated/unreadable shards under ``bad_shards`` and ``clean`` is true only without any.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finegrain data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="JSONL/CSV manifest + image folder -> webdataset shards")
    c.add_argument("--manifest", required=True, help="JSONL or CSV with an 'image' column")
    c.add_argument("--images", default="", help="image folder ('' = the manifest's folder)")
    c.add_argument("--out", required=True, help="output folder for NNNNN.tar shards")
    c.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    c.add_argument("--split", default="", help="keep only rows with this 'split' value")
    c.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty --out: its old *.tar shards are deleted first")  # fmt: skip
    c.add_argument(
        "--layout",
        default="plain",
        choices=("plain", "dreamlip"),
        help="dreamlip: DreamLIP caption CSV (raw_caption, short/long IB/SV/LLA captions)",
    )
    c.add_argument("--image-column", default="image", help="image path column (dreamlip)")
    i = sub.add_parser("inspect", help="counts, fields present and broken samples of shards")
    i.add_argument("shards", help="shard path, brace pattern or glob: 'dir/{00000..00009}.tar', "
                   "'dir/*.tar'")  # fmt: skip
    s = sub.add_parser("synthesize", help="synthetic training scenes -> webdataset shards")
    s.add_argument("--out", required=True)
    s.add_argument("--num", type=int, required=True, help="number of scenes")
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", type=int, default=1000)
    s.add_argument("--format", default="jpg", choices=("jpg", "png", "webp"))
    s.add_argument("--box-jitter", type=float, default=0.0, help="region box noise (x box size)")
    s.add_argument("--drop-region-prob", type=float, default=0.0, help="missed detections")
    s.add_argument("--novel-object-prob", type=float, default=0.1)
    return p


def _pattern(paths: list[str]) -> str:
    if not paths:
        return ""
    folder = Path(paths[0]).parent
    return str(folder / f"{{00000..{len(paths) - 1:05d}}}.tar")


def main(argv: list[str]) -> int:
    """Run ``finegrain data ...``; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help or a usage error (argparse already printed it)
        return int(e.code or 0)
    from finegrain.data import shards

    start = time.perf_counter()
    try:
        if args.command == "convert":
            out = shards.convert_manifest(
                args.manifest,
                args.images,
                args.out,
                args.shard_size,
                args.split,
                overwrite=args.overwrite,
                layout=args.layout,
                image_column=args.image_column,
            )
            out["pattern"] = _pattern(out["shards"])
            for s in out["skipped"][:20]:  # the JSON on stdout lists them all (up to 200)
                print(f"skipped {args.manifest}:{s['line']} ({s['image']}): {s['reason']}: "
                      f"{s['detail']}", file=sys.stderr)  # fmt: skip
        elif args.command == "inspect":
            out = shards.inspect_shards(args.shards)
        else:
            from finegrain.data.config import SyntheticConfig

            cfg = SyntheticConfig(
                seed=args.seed,
                num_samples=args.num,
                box_jitter=args.box_jitter,
                drop_region_prob=args.drop_region_prob,
                novel_object_prob=args.novel_object_prob,
            )
            paths = shards.synthesize(
                args.out, args.num, args.image_size, args.seed, args.shard_size, cfg, args.format
            )
            out = {"shards": paths, "pattern": _pattern(paths), "written": args.num}
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out["seconds"] = round(time.perf_counter() - start, 3)
    try:
        print(json.dumps(out, indent=1), flush=True)
    except BrokenPipeError:  # e.g. `finegrain data inspect ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
