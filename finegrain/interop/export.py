"""``finegrain export``: a run (or any loadable spec) in another library's format.

    finegrain export runs/clip_smoke --format open_clip --out exported/oc
    finegrain export runs/clip_smoke --format hf --out exported/hf
    finegrain export runs/flair_smoke --format towers --out exported/towers

- ``open_clip``: an OpenCLIP ``local-dir`` (``open_clip_config.json`` + safetensors) for CLIP-
  style methods (clip, siglip, and FLAIR's global CLIP path): towers, projections, logit scale
  (and bias);
  ``open_clip.create_model_and_transforms('local-dir:OUT')`` loads it.
- ``hf``: a ``transformers`` ``CLIPModel`` (or ``SiglipModel`` for HF-tower SigLIP) folder with
  tokenizer and preprocessor config; ``CLIPModel.from_pretrained(OUT)`` loads it.
- ``towers`` (every method): ``image_tower.safetensors`` / ``text_tower.safetensors``, each in
  the tower's own library layout (OpenCLIP ``visual.*`` / text keys for open_clip and native
  towers, timm keys for timm towers, Hugging Face keys for HF towers) + ``towers.json`` naming
  the architecture of each; plus the method's projections (``image_proj``/``text_proj``, each
  (E, W)) and logit scale/bias when it has them (``projections.safetensors``; GRAIN applies its
  ``image_proj`` after the region decoder, not to the tower output).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from finegrain.checkpoint.run_dirs import resolve_run
from finegrain.errors import run_subcommand
from finegrain.interop import load_spec
from finegrain.interop.common import image_tower, projection_weight, read_scale_bias
from finegrain.interop.hf import export as hf_export
from finegrain.interop.open_clip import _tower_state
from finegrain.interop.open_clip import export as oc_export

FORMATS = ("open_clip", "hf", "towers")


def tower_export(tower: nn.Module, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict in the tower's library layout, description) of one tower."""
    name = type(tower).__name__
    if name in ("VisionTransformer", "OpenCLIPVision", "TextTransformer", "OpenCLIPText"):
        sd, cfg = _tower_state(tower, kind)
        prefix = "visual." if kind == "image" else ""
        return {prefix + k: v for k, v in sd.items()}, {"layout": "open_clip", "class": name, **cfg}
    for attr, layout in (("model", "timm_or_hf"), ("vision_model", "hf"), ("text_model", "hf")):
        inner = getattr(tower, attr, None)
        if isinstance(inner, nn.Module):
            sd = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
            arch = (
                getattr(getattr(inner, "config", None), "name_or_path", "") or type(inner).__name__
            )
            if layout == "timm_or_hf":
                layout = "hf" if hasattr(inner, "config") else "timm"
            return sd, {"layout": layout, "class": type(inner).__name__, "arch": str(arch)}
    sd = {k: v.detach().cpu() for k, v in tower.state_dict().items()}
    return sd, {"layout": "finegrain", "class": name}


def export_towers(method: nn.Module, out: Path) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}
    for kind, tower in (("image", image_tower(method)), ("text", method.text)):
        sd, desc = tower_export(tower, kind)
        save_file(
            {k: v.contiguous() for k, v in sd.items()}, str(out / f"{kind}_tower.safetensors")
        )
        info[kind] = desc
    extra: dict[str, torch.Tensor] = {}
    for name in ("image_proj", "text_proj"):
        try:
            w = projection_weight(method.towers().get(name))
        except ValueError:
            w = None
        if w is not None:
            extra[f"{name}.weight"] = w.contiguous().cpu()  # (E, W): y = x @ W^T
    try:
        scale, bias = read_scale_bias(method)
        extra["logit_scale"] = scale
        if bias is not None:
            extra["logit_bias"] = bias
    except ValueError:
        pass
    if extra:
        save_file(extra, str(out / "projections.safetensors"))
    (out / "towers.json").write_text(json.dumps(info, indent=2))
    return out


# (image tower, text tower) pairs each format can hold (both native or both open_clip)
OPEN_CLIP_TOWERS = (("vit", "transformer"), ("open_clip", "open_clip"))
HF_TOWERS = ("hf_clip", "hf_clip")


def check_towers(cfg: Any, fmt: str) -> None:
    """One line naming what to do when ``fmt`` cannot hold this run's towers (e.g. the demo's
    EfficientNet-Lite0 image tower has no OpenCLIP / Hugging Face CLIP equivalent)."""
    towers = (cfg.method.image.name, cfg.method.text.name)
    if fmt == "open_clip":
        ok, takes = towers in OPEN_CLIP_TOWERS, "vit + transformer or open_clip + open_clip"
    else:  # hf: native towers are converted through the OpenCLIP layout (clip only)
        ok = towers == HF_TOWERS or (cfg.method.name == "clip" and towers in OPEN_CLIP_TOWERS)
        takes = "hf_clip + hf_clip, or for clip vit + transformer or open_clip + open_clip"
    if not ok:
        raise ValueError(f"--format {fmt} takes {takes} towers; this run has {towers[0]} + "
                         f"{towers[1]}: use --format towers (every method and tower)")  # fmt: skip


def export(spec: str, fmt: str, out: Path) -> Path:

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}'; valid choices: {', '.join(FORMATS)}")
    method, cfg, _ = load_spec(spec)
    if fmt == "towers":
        return export_towers(method, out)
    # FLAIR's global path (CLS -> image_proj, EOT -> text_proj) is a CLIP model (its
    # released get_logits_as_clip); GRAIN's global embedding goes through its decoder: not CLIP.
    allowed = ("clip", "siglip", "flair") if fmt == "open_clip" else ("clip", "siglip")
    if cfg.method.name not in allowed:
        raise ValueError(f"--format {fmt} is for {'/'.join(allowed)} methods, not "
                         f"'{cfg.method.name}'; use --format towers")  # fmt: skip
    check_towers(cfg, fmt)
    if fmt == "open_clip":
        return oc_export(method, cfg, out)

    return hf_export(method, cfg, out)


def build_parser() -> argparse.ArgumentParser:
    """The ``finegrain export`` argument parser."""
    p = argparse.ArgumentParser(prog="finegrain export", description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN_OR_SPEC",
                   help="run dir (or a demo folder holding one run), checkpoint, or a spec "
                   "(hf:DIR, ...)")  # fmt: skip
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="open_clip: clip/siglip/flair on vit|open_clip + transformer|open_clip "
                   "towers; hf: clip on those towers, clip/siglip on hf_clip towers; towers: "
                   "every method")  # fmt: skip
    p.add_argument("--out", default="", help="output folder (default: <run>/export/<format>)")
    return p


def main(argv: list[str]) -> int:
    """Entry point of ``finegrain export``; returns the exit code (2 for user mistakes)."""
    return run_subcommand("finegrain export", build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    base = Path(args.run)
    out = (
        Path(args.out)
        if args.out
        else (resolve_run(base) if base.is_dir() else base.parent) / "export" / args.format
    )
    export(args.run, args.format, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0
