"""Region-to-description contrastive loss (GRAIN, Halbe et al., arXiv 2412.04429, L_rd).

Each region query that the Hungarian matcher paired with an annotated box is a positive of
that box's description; every other description in the batch is a negative:

    L_rd = -1/M sum_i log( exp(s * <r_i, d_t(i)>) / sum_{j in N(i)} exp(s * <r_i, d_j>) )

with ``r_i`` the i-th matched region embedding, ``d_j`` the description embeddings (all
unit-norm), ``s`` the logit scale and ``t(i)`` the matched description. Differences to the
released code, as options:

- ``dedup``: descriptions with the same text as ``d_t(i)`` (e.g. two images with "a red
  circle") are *removed from the denominator* ``N(i)`` instead of acting as negatives (the
  released code treats them as negatives). The positive itself stays.
- ``symmetric``: also the description -> region direction (each matched description against
  all matched regions, duplicates of its text masked the same way); the two directions are
  averaged as in CLIP. The released code is one-directional (region -> description).
- ``gather``: descriptions (and, for the symmetric term, regions) from all ranks become
  negatives via ``finegrain.losses.distributed.all_gather_with_grad``; the released code
  uses the local batch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finegrain.losses.distributed import all_gather_no_grad, all_gather_with_grad, world_info


def text_ids(tokens: torch.Tensor) -> torch.Tensor:
    """(N, L) token ids -> (N,) integer id per distinct text (equal rows share an id)."""
    if tokens.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=tokens.device)
    return torch.unique(tokens, dim=0, return_inverse=True)[1]


def _gather(x: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, int]:
    """Concatenate equal-sized ``x`` over ranks; returns (gathered, offset of this rank)."""
    rank, world = world_info()
    if world == 1:
        return x, 0
    out = all_gather_with_grad(x, check_sizes=True) if with_grad else all_gather_no_grad(x)
    return out, rank * x.shape[0]


def _masked_ce(logits: torch.Tensor, target: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over rows; columns flagged in ``drop`` are removed (the target never is)."""
    drop = drop.clone()
    drop[torch.arange(len(target), device=logits.device), target] = False
    return F.cross_entropy(logits.masked_fill(drop, float("-inf")), target)


def region_description_loss(
    regions: torch.Tensor,
    descriptions: torch.Tensor,
    matched: torch.Tensor,
    valid: torch.Tensor,
    logit_scale: torch.Tensor | float,
    desc_tokens: torch.Tensor | None = None,
    *,
    dedup: bool = True,
    symmetric: bool = False,
    gather: bool = False,
) -> torch.Tensor:
    """GRAIN's L_rd over description *slots* (fixed count per rank, so ranks can gather).

    regions: (N, D) unit-norm region embedding matched to slot n (any value if unmatched).
    descriptions: (N, D) unit-norm embedding of the description in slot n.
    matched: (N,) bool, slot n has a real description paired with a region query.
    valid: (N,) bool, slot n holds a real description (a negative for every other row).
    desc_tokens: (N, L) token ids of each slot; equal rows are the same text (``dedup``).
    Returns the mean over matched slots (of all ranks' rows on this rank; 0 with a graph if
    there is none).
    """
    n, d = descriptions.shape
    assert regions.shape == (n, d), f"regions {tuple(regions.shape)} vs descriptions {(n, d)}"
    assert matched.shape == (n,) and valid.shape == (n,), "matched/valid must be (N,)"
    if dedup and desc_tokens is None:
        raise ValueError("region_description_loss(dedup=True) needs desc_tokens")
    matched = matched & valid
    desc_all, off = _gather(descriptions, with_grad=True) if gather else (descriptions, 0)
    valid_all = _gather(valid, with_grad=False)[0] if gather else valid
    rows = torch.nonzero(matched).squeeze(1)  # (M,) local slots
    if rows.numel() == 0:
        return regions.sum() * 0.0 + descriptions.sum() * 0.0
    tgt = rows + off  # positives' columns in the gathered descriptions
    if dedup:
        tok_all = _gather(desc_tokens, with_grad=False)[0] if gather else desc_tokens
        ids_all = text_ids(tok_all)  # (N_all,) same text -> same id, consistent over ranks
    drop = ~valid_all[None, :].expand(rows.numel(), -1)  # padding is never a negative
    if dedup:
        drop = drop | (ids_all[None, :] == ids_all[tgt][:, None])
    logits = logit_scale * regions[rows] @ desc_all.t()  # (M, N_all)
    loss = _masked_ce(logits, tgt, drop)
    if not symmetric:
        return loss
    # description -> region: rows are matched descriptions, columns every matched region.
    reg_all = _gather(regions, with_grad=True)[0] if gather else regions
    matched_all = _gather(matched, with_grad=False)[0] if gather else matched
    drop_t = ~matched_all[None, :].expand(rows.numel(), -1)
    if dedup:
        drop_t = drop_t | (ids_all[None, :] == ids_all[tgt][:, None])
    logits_t = logit_scale * descriptions[rows] @ reg_all.t()  # (M, N_all)
    return 0.5 * (loss + _masked_ce(logits_t, tgt, drop_t))
