"""``python -m finegrain.interop.backbone RUN_OR_SPEC OUT.pth``: the image backbone of a run (or
any spec ``finegrain.interop.load_spec`` takes) as a timm ``VisionTransformer`` state dict, for
the dense protocols run in other frameworks (``finegrain.encoders.export`` holds the key mapping
and the mmsegmentation notes)."""

from __future__ import annotations

import argparse

from finegrain.encoders.export import export_image_backbone
from finegrain.errors import run_subcommand
from finegrain.interop import load_spec


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2, one line on stderr, for user mistakes)."""
    p = argparse.ArgumentParser(prog="python -m finegrain.interop.backbone",
                                description="export the image backbone as a timm ViT state dict")  # fmt: skip
    p.add_argument("checkpoint", help="run dir, checkpoint dir, .safetensors file or a spec")
    p.add_argument("out", help="output .pth file")
    return run_subcommand("finegrain backbone export", p, _run, argv)


def _run(args: argparse.Namespace) -> int:
    method, _, _ = load_spec(args.checkpoint)
    out = export_image_backbone(method, args.out)
    print(f"wrote {args.out}: {len(out['state_dict'])} tensors, timm kwargs {out['timm_kwargs']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
