"""The learnable logit scale (and bias) of contrastive losses, in one unit for every method.

Logits are ``t * cos(x, y) (+ b)``. ``t`` (the inverse softmax temperature, CLIP Sec. 2.5) is
learned as ``s = ln t`` so that it stays positive; ``b`` is SigLIP's bias (Zhai et al. 2023,
Sec. 3.2), also used by FLAIR. Every setting is given in the unit of ``t``:

- ``init_scale``: t at initialisation (CLIP: 1/0.07; SigLIP: 10);
- ``max_scale``: after every optimizer step ``s`` is clamped to ``[0, ln max_scale]``, i.e.
  ``1 <= t <= max_scale`` (CLIP, FLAIR, GRAIN's released code: 100); ``0`` disables the clamp
  (big_vision's SigLIP);
- ``learnable=False`` keeps ``t`` (and ``b``) fixed: they are then buffers, still checkpointed;
- ``bias_prior=True``: the first training batch sets ``b`` to its prior log-odds
  ``prior_logit_bias(B) = -ln(B - 1)`` (``init_bias_from_batch``), once; a loaded state dict
  keeps its own ``b``. SigLIP's b = -10 (Zhai et al. 2023, Sec. 3.2) is that prior at its 32k
  batch (-ln 32767 = -10.4); at the batches of a CPU run (B = 64: -4.1) b = -10 cannot move
  there in a few hundred AdamW steps (|db| <= lr per step) and the embeddings collapse into a
  constant-logit saddle instead (docs/flair_scenes.md). Used by SigLIP and FLAIR
  (``method.logit_bias_init``).

The parameters live on the module that owns the loss, as ``logit_scale`` (= s) and
``logit_bias``, so that every method's checkpoint names them the same way (and checkpoints
written before this module existed still load). ``LogitScale`` is the bound helper that creates
them and reads/clamps them; it is not itself a submodule.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def prior_logit_bias(batch_size: int) -> float:
    """The log-odds of a positive pair among ``B`` candidates: ln((1/B) / (1 - 1/B)) = -ln(B - 1);
    0 for B <= 2."""
    return -math.log(max(batch_size - 1, 1))


class LogitScale:
    """``t = exp(s)`` and optional ``b``; see the module docstring for units."""

    def __init__(
        self,
        init_scale: float,
        max_scale: float = 0.0,
        learnable: bool = True,
        bias_init: float | None = None,
        bias_prior: bool = False,
    ) -> None:
        if not init_scale > 0:
            raise ValueError(f"init logit scale must be a temperature t > 0, got {init_scale}")
        if max_scale < 0 or (max_scale > 0 and max_scale < 1):
            raise ValueError(
                f"max logit scale must be 0 (no clamp) or a temperature t >= 1, got {max_scale}"
            )
        if max_scale > 0 and init_scale > max_scale:
            raise ValueError(f"init logit scale {init_scale} exceeds the max {max_scale}")
        self.init_scale, self.max_scale = float(init_scale), float(max_scale)
        if bias_prior and bias_init is None:
            raise ValueError("bias_prior needs a logit bias (pass bias_init=...)")
        self.learnable, self.bias_init, self.bias_prior = learnable, bias_init, bias_prior
        # a plain reference (deepcopy/pickle of the owner keep the cycle consistent)
        self._owner: nn.Module | None = None

    def install(self, owner: nn.Module) -> LogitScale:
        """Register ``owner.logit_scale`` (s = ln t) and, with ``bias_init``, ``owner.logit_bias``
        (parameters, or buffers when not learnable); returns ``self`` bound to ``owner``."""
        values = {"logit_scale": math.log(self.init_scale)}
        if self.bias_init is not None:
            values["logit_bias"] = float(self.bias_init)
        for name, value in values.items():
            tensor = torch.tensor(value)
            if self.learnable:
                owner.register_parameter(name, nn.Parameter(tensor))
            else:
                owner.register_buffer(name, tensor)
        # b <- the first training batch's prior once; a loaded state dict keeps its own b
        owner.bias_pending = self.bias_prior
        if self.bias_prior:
            owner.register_load_state_dict_pre_hook(_bias_loaded)
        self._owner = owner
        return self

    @torch.no_grad()
    def init_bias_from_batch(self, batch_size: int) -> None:
        """With ``bias_prior``: b <- ``prior_logit_bias(batch_size)`` at the first call in
        training mode (pass the joined batch: all ranks and micro-batches); else nothing."""
        owner = self.owner
        if owner.training and getattr(owner, "bias_pending", False):
            owner.logit_bias.fill_(prior_logit_bias(batch_size))
            owner.bias_pending = False

    @property
    def owner(self) -> nn.Module:
        if self._owner is None:
            raise RuntimeError("LogitScale is not installed on a module (call install(owner))")
        return self._owner

    def scale(self) -> torch.Tensor:
        """t = exp(s), a 0-d tensor in the graph (gradient reaches ``logit_scale``)."""
        return self.owner.logit_scale.exp()

    def bias(self) -> torch.Tensor:
        """b, a 0-d tensor in the graph; an error when created without ``bias_init``."""
        if self.bias_init is None:
            raise ValueError("this logit scale has no bias (create it with bias_init=...)")
        return self.owner.logit_bias

    @torch.no_grad()
    def clamp_(self) -> None:
        """After an optimizer step: ``s`` into ``[0, ln max_scale]`` (nothing when max is 0)."""
        if self.max_scale > 0:
            self.owner.logit_scale.clamp_(0.0, math.log(self.max_scale))

    def metrics(self) -> dict[str, torch.Tensor]:
        """``logit_scale`` (t) and ``logit_bias`` (b) for logging, detached."""
        out = {"logit_scale": self.scale().detach()}
        if self.bias_init is not None:
            out["logit_bias"] = self.bias().detach()
        return out


def _bias_loaded(module: nn.Module, *args: object) -> None:
    """``load_state_dict`` pre-hook: the loaded b is kept (no prior re-initialisation)."""
    module.bias_pending = False
