"""``python -m finegrain.interop.backbone RUN_OR_SPEC OUT.pth``: the image backbone of a run (or
any spec ``finegrain.interop.load_spec`` takes) as a timm ``VisionTransformer`` state dict, for
the dense protocols run in other frameworks (``finegrain.encoders.export`` holds the key mapping
and the mmsegmentation notes)."""

from __future__ import annotations

import argparse
import sys

from finegrain.encoders.export import export_image_backbone
from finegrain.errors import one_line
from finegrain.interop import load_spec

USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2, one line on stderr, for user mistakes)."""
    p = argparse.ArgumentParser(prog="python -m finegrain.interop.backbone",
                                description="export the image backbone as a timm ViT state dict")  # fmt: skip
    p.add_argument("checkpoint", help="run dir, checkpoint dir, .safetensors file or a spec")
    p.add_argument("out", help="output .pth file")
    args = p.parse_args(argv)
    try:
        method, _, _ = load_spec(args.checkpoint)
        out = export_image_backbone(method, args.out)
    except (ValueError, FileNotFoundError) as e:
        msg = one_line(e)
        print(f"finegrain backbone export: error: {msg}", file=sys.stderr)
        return USER_ERROR
    print(f"wrote {args.out}: {len(out['state_dict'])} tensors, timm kwargs {out['timm_kwargs']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
