"""Typed outputs shared by towers, methods and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class VisionOutput:
    """What every image tower returns.

    pooled:    (B, D) the tower's global vector (CLS token after the final norm for ViTs,
               the average of the last feature map for convnets).
    tokens:    (B, N, D) patch tokens after the final norm, CLS/register tokens excluded.
    grid_hw:   (h, w) the FULL patch grid of the input image. Without ``keep``, N == h * w and
               the tokens reshape to a (B, D, h, w) map (``token_map``).
    keep:      (B, M) long or None: the row-major grid indices (0 <= idx < h * w) of the patches
               that went through the blocks (a ``keep=`` argument or training-time patch
               dropout); then N == M and ``tokens[:, j]`` is patch ``keep[:, j]``.
    attention: (B, k, heads, N) or None: the CLS query's softmax attention over the patch
               tokens in each of the last k blocks (``return_attention=``), prefix columns
               dropped without renormalising (a row sums to 1 minus the prefix mass).
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    grid_hw: tuple[int, int]
    keep: torch.Tensor | None = None
    attention: torch.Tensor | None = None

    def __post_init__(self) -> None:
        h, w = self.grid_hw
        assert self.tokens.dim() == 3, f"tokens must be (B, N, D), got {tuple(self.tokens.shape)}"
        b, n, _ = self.tokens.shape
        if self.keep is None:
            assert n == h * w, f"tokens N={n} does not match grid {h}x{w}"
        else:
            assert tuple(self.keep.shape) == (b, n), (
                f"keep {tuple(self.keep.shape)} does not match tokens (B, N) = {(b, n)}"
            )
        if self.attention is not None:
            a = self.attention
            assert a.dim() == 4 and (a.shape[0], a.shape[3]) == (b, n), (
                f"attention must be (B, k, heads, N) = ({b}, k, heads, {n}), got {tuple(a.shape)}"
            )

    def token_map(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens as a (B, D, h, w) feature map (only when every patch was kept);
        ``tokens`` (B, N, D'): per-patch features of this output's grid (e.g. projected) to lay
        out instead of ``self.tokens``."""
        if self.keep is not None:
            raise ValueError(
                "VisionOutput.token_map(): the tokens are a subset (keep) of the "
                f"{self.grid_hw[0]}x{self.grid_hw[1]} grid, not a full map; scatter them by keep"
            )
        tokens = self.tokens if tokens is None else tokens
        b, _, d = tokens.shape
        h, w = self.grid_hw
        return tokens.transpose(1, 2).reshape(b, d, h, w)


@dataclass
class TextOutput:
    """What every text tower returns.

    pooled: (B, D) sentence vector (EOT token for causal CLIP towers, mean/CLS for encoders).
    tokens: (B, L, D) per-token states after the final norm.
    mask:   (B, L) bool, True where the token is real (not padding).
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


@dataclass
class MethodOutput:
    """The one contract between a method and the trainer.

    loss:    scalar tensor to backpropagate (already weighted and summed).
    losses:  named loss terms for logging; every key ends with ``_loss``; detached here, the
             one place (a method may pass them with their graph).
    metrics: anything else worth logging (logit scale, accuracy, ...); floats or 0-d tensors.
    stats:   counts of this step that are not per-sample features (matched boxes, ...); the
             trainer adds the collate's ``batch["stats"]`` (summed over micro-batches), logs
             ``stats/<name>`` and sums them into summary.json's ``"stats"``.
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [k for k in self.losses if not k.endswith("_loss")]
        assert not bad, f"loss terms must be named '*_loss', got {bad}"
        self.losses = {
            k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in self.losses.items()
        }
