"""Helpers shared by the converters: logit scale/bias access, key renaming, projection access."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from finegrain.heads.projection import Projection


def rename(
    sd: dict[str, torch.Tensor], rule: Callable[[str], str | None]
) -> dict[str, torch.Tensor]:
    """Apply ``rule`` to every key; keys mapped to None are dropped."""
    out = {}
    for k, v in sd.items():
        new = rule(k)
        if new is not None:
            out[new] = v
    return out


def scale_bias_keys(method: nn.Module) -> tuple[str, str | None]:
    """State-dict keys of the method's log logit scale ``s`` (t = exp(s)) and bias (or None)."""
    own = method.state_dict()

    def find(name: str) -> str | None:
        if name in own:  # on the method itself (finegrain.heads.logit_scale installs it there)
            return name
        found = [k for k in own if k.endswith("." + name)]  # or on one submodule (a loss)
        return found[0] if len(found) == 1 else None

    scale, bias = find("logit_scale"), find("logit_bias")
    if scale is None:
        raise ValueError(f"method {type(method).__name__} has no (unique) logit_scale to map")
    return scale, bias


def read_scale_bias(method: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(s, b): the log logit scale and the bias (None without one) as 0-d CPU tensors."""
    own = method.state_dict()
    scale, bias = scale_bias_keys(method)
    return own[scale].detach().cpu().reshape(()), (
        None if bias is None else own[bias].detach().cpu().reshape(())
    )


def projection_weight(module: nn.Module | torch.Tensor | None) -> torch.Tensor | None:
    """(E, W) weight of a projection: ``finegrain.heads.projection.Projection`` (None for
    ``none``), ``nn.Linear`` (bias-free) or a ``(W, E)`` parameter used as ``x @ P``."""
    if module is None:
        return None
    if isinstance(module, torch.Tensor):
        return module.detach().t()
    if isinstance(module, Projection):
        return None if module.weight is None else module.weight.detach()
    if isinstance(module, nn.Linear):
        if module.bias is not None:
            raise ValueError("projections with a bias cannot be exported")
        return module.weight.detach()
    raise ValueError(f"cannot export a projection of type {type(module).__name__}")


def image_tower(method: nn.Module) -> nn.Module:
    tower = method.towers().get("image")
    if tower is None:
        raise ValueError(f"method {type(method).__name__} has no image tower")
    return tower


def tower_prefix(method: nn.Module, tower: nn.Module) -> str:
    for name, mod in method.named_children():
        if mod is tower:
            return name + "."
    raise ValueError("tower is not a direct child of the method")


def place_scale_bias(sd: dict[str, torch.Tensor], method: nn.Module) -> dict[str, torch.Tensor]:
    """Move converted ``logit_scale`` / ``logit_bias`` entries to where ``method`` keeps them."""
    scale, bias = scale_bias_keys(method)
    out = dict(sd)
    for name, key in (("logit_scale", scale), ("logit_bias", bias)):
        if key is not None and key != name and name in out:
            out[key] = out.pop(name)
    return out
