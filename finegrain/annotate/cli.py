"""``finegrain annotate``: GRAIN's annotation step over shards (see ``pipeline``).

Example::

    finegrain annotate --input 'shards/{00000..00009}.tar' --output-dir ann/ \
        --describer ~/models/llava-1.5-7b-hf --detector ~/models/owlv2-base-patch16 \
        --format jsonl --box-threshold 0.1

Run one process per GPU with ``--rank i --world-size n`` (or torchrun's RANK/WORLD_SIZE);
re-running resumes.
"""

from __future__ import annotations

import argparse
import json
import sys

from finegrain.annotate.pipeline import FORMATS, AnnotateConfig, annotate, merge_sidecars


def build_parser() -> argparse.ArgumentParser:
    d = AnnotateConfig()
    p = argparse.ArgumentParser(prog="finegrain annotate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input", required=True, help="shards: 'dir/{000..009}.tar', a glob, or a comma list"
    )
    p.add_argument("--output-dir", required=True)
    p.add_argument(
        "--describer", required=True, help="local Hugging Face image-text-to-text model dir"
    )
    p.add_argument("--detector", required=True, help="local OWLv2 / OWL-ViT / Grounding DINO dir")
    p.add_argument("--format", dest="output_format", default=d.output_format, choices=FORMATS)
    p.add_argument(
        "--prompt", default=d.prompt, help="MLLM prompt (or @file to read it from a file)"
    )
    p.add_argument("--box-threshold", type=float, default=d.box_threshold)
    p.add_argument("--max-regions", type=int, default=d.max_regions)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--device", default=d.device)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--world-size", type=int, default=d.world_size)
    p.add_argument("--no-resume", dest="resume", action="store_false")
    p.add_argument(
        "--merge-to", default="", help="after annotating, join all *.jsonl into this sidecar file"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str]) -> int:
    """Entry point used by ``finegrain annotate ...``; returns the exit status."""
    args = vars(build_parser().parse_args(argv))
    merge_to = args.pop("merge_to")
    if args["prompt"].startswith("@"):
        with open(args["prompt"][1:]) as fh:
            args["prompt"] = fh.read().strip()
    try:
        stats = annotate(AnnotateConfig(**args))
        if merge_to:
            stats["merged_lines"] = merge_sidecars(args["output_dir"], merge_to)
    except ValueError as e:
        print(f"finegrain annotate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(stats, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
