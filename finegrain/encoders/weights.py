"""Loading local weight files safely (safetensors or ``torch.load(weights_only=True)``).

- ``.safetensors``: read with safetensors (no code at all).
- torch files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``): ``torch.load(weights_only=True)``
  (plus ``argparse.Namespace``, plain data that training checkpoints keep as ``args``);
  a pickle that would need code execution (custom classes, lambdas) is refused with one line.
- TorchScript archives (OpenAI's original CLIP ``.pt`` files): only their tensors are read
  (``torch.jit.load(...).state_dict()``; TorchScript cannot run arbitrary Python code).
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

# checkpoint wrappers, tried in order ("teacher": DINO training checkpoints, whose teacher is
# the released/evaluated backbone; "backbone_state_dict": GRAIN's training checkpoints keep the
# CLIP towers there and the region decoder under "state_dict")
WRAPPER_KEYS = ("backbone_state_dict", "state_dict", "model", "module", "model_state", "teacher")
# OpenAI TorchScript archives carry these ints next to the weights
TORCHSCRIPT_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 2)[1:2] == ["code"] for n in z.namelist()[:200])


def _torch_load(path: Path) -> object:
    if _is_torchscript(path):
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        return {k: v for k, v in sd.items() if k not in TORCHSCRIPT_EXTRAS}
    try:  # argparse.Namespace: the ``args`` that SLIP-lineage checkpoints (DetailCLIP) keep
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"refusing to load {path}: the file is a pickle that needs code execution "
            "(not plain tensors); convert it to .safetensors where it was made"
        ) from None


def read_weights(path: str | Path) -> object:
    """The object a ``.safetensors`` file or torch checkpoint holds, read safely (no code runs:
    safetensors, ``torch.load(weights_only=True)`` or a TorchScript archive's tensors)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return _torch_load(path)


def flat_state_dict(
    obj: object, source: str | Path, wrapper: str | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint object (``read_weights``) as a flat state dict: the first of
    ``WRAPPER_KEYS`` it holds is unwrapped, or ``wrapper`` where given (GRAIN's files hold a
    ``state_dict`` next to the ``backbone_state_dict``), and DDP's ``module.`` prefix removed."""
    sd = obj
    if wrapper is not None:
        if not (isinstance(sd, dict) and isinstance(sd.get(wrapper), dict)):
            keys = sorted(sd)[:8] if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(f"{source} has no '{wrapper}' state dict (top level: {keys})")
        sd = sd[wrapper]
    for key in WRAPPER_KEYS if wrapper is None else ():
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{source} does not hold a state dict (got {type(sd).__name__})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if sd and not tensors:
        raise ValueError(f"{source} holds no tensors at the top level (keys {sorted(sd)[:5]})")
    return tensors


def load_state_dict_file(path: str | Path, wrapper: str | None = None) -> dict[str, torch.Tensor]:
    """A flat state dict from a ``.safetensors`` file or a torch checkpoint (``read_weights``
    then ``flat_state_dict``): common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and
    DDP's ``module.`` prefix are removed. Never unpickles arbitrary objects."""
    path = Path(path).expanduser()
    return flat_state_dict(read_weights(path), path, wrapper)


@dataclass
class LoadReport:
    """What a non-strict load left out (empty lists after a strict load)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, n: int = 5) -> str:
        return (
            f"{len(self.missing)} missing {self.missing[:n]}, {len(self.unexpected)} unexpected "
            f"{self.unexpected[:n]}, {len(self.mismatched)} mis-shaped {self.mismatched[:n]}"
        )


def load_into(
    model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, strict: bool = True
) -> LoadReport:
    """Load ``sd`` into ``model``; strict: one clear ``ValueError`` naming the first missing,
    unexpected and mis-shaped keys. ``strict=False`` loads what fits and returns (and warns
    with) the list of what was skipped."""
    own = model.state_dict()
    report = LoadReport(
        missing=sorted(set(own) - set(sd)),
        unexpected=sorted(set(sd) - set(own)),
        mismatched=[
            f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
            for k in sorted(set(own) & set(sd))
            if sd[k].shape != own[k].shape
        ],
    )
    if report.clean:
        model.load_state_dict(sd, strict=True)
        return report
    if strict:
        raise ValueError(
            f"weights {source} do not fit {type(model).__name__}: {report.summary()} "
            "(strict=False loads what fits and lists what was skipped)"
        )
    bad = {m.split(":")[0] for m in report.mismatched}
    model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in bad}, strict=False)
    import warnings

    warnings.warn(f"weights {source} loaded with strict=False: skipped {report.summary()}",
                  stacklevel=2)  # fmt: skip
    return report
