"""Loading local weight files safely (safetensors or ``torch.load(weights_only=True)``)."""

from __future__ import annotations

from pathlib import Path

import torch

WRAPPER_KEYS = ("state_dict", "model", "module", "model_state")
SHOW = 5  # keys listed per kind in a mismatch error


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a ``.safetensors`` file or a torch checkpoint.

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and DDP's ``module.`` prefix
    are removed. Never unpickles arbitrary objects (``weights_only=True``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in WRAPPER_KEYS:
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with one clear ``ValueError``: how many keys are missing / unexpected /
    mis-shaped, and the first ``SHOW`` of each (file shape vs model shape), so a checkpoint of
    another architecture (ViT-S weights for a ViT-B tower, a DINO file for an open_clip tower)
    is recognisable from the message alone."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(sd))
        if sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(keys)} {what} (first: {', '.join(keys[:SHOW])})"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("mis-shaped", shapes),
            )  # fmt: skip
            if keys
        ]
        raise ValueError(
            f"weights {source} do not fit {type(model).__name__} (the configured architecture): "
            + "; ".join(parts)
        )
    model.load_state_dict(sd, strict=True)
