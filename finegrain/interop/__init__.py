"""Weights in and out: load OpenCLIP, Hugging Face and FLAIR checkpoints into finegrain
methods, export finegrain runs to OpenCLIP and Hugging Face formats.

A *spec* names what to load:

- ``open_clip:MODEL=FILE``: an OpenCLIP checkpoint (``.pt``/``.bin``/``.safetensors`` state dict,
  OpenAI-style keys or OpenCLIP training checkpoints) of architecture ``MODEL`` (an
  ``open_clip.list_models()`` name or a model-config ``.json`` file) -> ``clip`` (``siglip``
  when the file holds a ``logit_bias``) with open_clip towers (``finegrain.interop.open_clip``);
- ``hf:DIR``: a Hugging Face ``CLIPModel`` / ``SiglipModel`` directory -> ``clip`` / ``siglip``
  with ``hf_clip`` towers (``finegrain.interop.hf``);
- ``flair:[MODEL=]FILE``: a released FLAIR checkpoint -> ``flair`` (``finegrain.interop.flair``);
- ``detailclip:[teacher=]FILE``: a released DetailCLIP training checkpoint -> ``clip`` with the
  released towers (``finegrain.interop.detailclip``);
- ``clippy:[ST5_DIR=]FILE``: the CLIPpy replication's OpenCLIP checkpoint (timm DINO trunk +
  Sentence-T5 with its ``2_Dense``) -> ``clippy`` (``finegrain.interop.clippy``);
- ``grain:FILE``: a GRAIN training checkpoint (grain-clip ``train.py``: region decoder +
  CLIP towers) -> ``grain`` (``finegrain.interop.grain``);
- anything else without a prefix: a finegrain run directory, checkpoint directory or
  ``model.safetensors`` file, or a folder holding one run (``finegrain demo``'s output folder
  or ``OUT/runs/<method>``: ``finegrain.checkpoint.run_dirs.resolve_run``).

Every loader returns ``(method in eval mode, RunConfig)`` whose ``data.mean``/``data.std`` and
``method.image.image_size`` are the checkpoint's preprocessing, so evaluation and
``finegrain.load`` treat external checkpoints exactly like finegrain runs.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from finegrain.checkpoint import LoadedRun, load_run
from finegrain.run_config import RunConfig

SPEC_PREFIXES = {
    "open_clip": "finegrain.interop.open_clip",
    "hf": "finegrain.interop.hf",
    "flair": "finegrain.interop.flair",
    "detailclip": "finegrain.interop.detailclip",
    "clippy": "finegrain.interop.clippy",
    "grain": "finegrain.interop.grain",
}
SPEC_HINT = "open_clip:MODEL=FILE, hf:DIR or flair:[MODEL=]FILE"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def split_spec(spec: str) -> tuple[str, str]:
    """``'hf:path/dir'`` -> ``('hf', 'path/dir')``; ``('', spec)`` for a plain path.

    A prefix is a leading ``word:`` that is not a Windows drive letter; unknown prefixes raise
    one line listing the valid ones."""
    head, sep, rest = spec.partition(":")
    if not sep or len(head) <= 1 or "/" in head or "\\" in head or "." in head:
        return "", spec
    if head not in SPEC_PREFIXES:
        valid = ", ".join(f"{p}:" for p in SPEC_PREFIXES)
        raise ValueError(
            f"unknown checkpoint spec prefix '{head}:' in '{spec}'; valid prefixes: {valid} "
            "(or a finegrain run directory / checkpoint path without a prefix)"
        )
    if not rest:
        raise ValueError(f"checkpoint spec '{spec}' names no file or directory after '{head}:'")
    return head, rest


def run_config(method_cfg: Any, name: str, mean: tuple, std: tuple) -> Any:
    """A ``RunConfig`` describing an external checkpoint (name, method, preprocessing)."""
    cfg = RunConfig(name=name, method=method_cfg)
    cfg.data.image_size = method_cfg.image.image_size
    cfg.data.mean, cfg.data.std = tuple(mean), tuple(std)
    return cfg


LoadedSpec = LoadedRun  # (method, cfg, weights file of a finegrain run or None)


def load_spec(spec: str, strict: bool = True, device: str = "cpu") -> LoadedRun:
    """Load any spec (see the module docstring): the one way a model is loaded for use
    (``finegrain.load``, ``finegrain eval``, ``predict``, ``export``). A finegrain run goes
    through ``finegrain.checkpoint.load_run``; ``weights`` names the file it resolved to (a
    report names the exact checkpoint without resolving the run dir a second time), ``None`` for
    other libraries' weights."""
    prefix, rest = split_spec(spec)
    if not prefix:
        valid = ", ".join(f"{p}:" for p in SPEC_PREFIXES)
        hint = f"weights of other libraries need a spec prefix: {valid} (e.g. open_clip:MODEL=FILE)"
        try:
            return load_run(rest, strict=strict, device=device, other_formats=hint)
        except FileNotFoundError as e:
            if Path(rest).expanduser().exists():  # a folder without a run: said in full
                raise
            raise FileNotFoundError(f"{e}; or a spec: {SPEC_HINT}") from None
    module = importlib.import_module(SPEC_PREFIXES[prefix])
    method, cfg = module.load(rest, strict=strict)
    return LoadedRun(method.to(device).eval(), cfg, None)


def load_method_spec(spec: str, strict: bool = True, device: str = "cpu") -> tuple[Any, Any]:
    """``(method in eval mode, RunConfig)`` of ``load_spec``."""
    method, cfg, _ = load_spec(spec, strict=strict, device=device)
    return method, cfg


__all__ = [
    "SPEC_PREFIXES",
    "LoadedSpec",
    "load_method_spec",
    "load_spec",
    "run_config",
    "split_spec",
]
