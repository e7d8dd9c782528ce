"""Region-to-description loss vs a naive loop written from the equation, with duplicates."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finegrain.losses.region import region_description_loss, text_ids


def naive(regions, descs, matched, valid, scale, texts, dedup, symmetric):
    """Loop reference: for each matched slot i, -log softmax over the allowed columns."""
    n = len(texts)
    rows = [i for i in range(n) if matched[i] and valid[i]]

    def term(query, keys, i, allowed):
        num = math.exp(scale * float(query @ keys[i]))
        den = sum(math.exp(scale * float(query @ keys[j])) for j in range(n) if allowed(j))
        return -math.log(num / den)

    def allowed_r2d(i):
        return lambda j: j == i or (valid[j] and not (dedup and texts[j] == texts[i]))

    def allowed_d2r(i):
        return lambda j: (
            j == i or (matched[j] and valid[j] and not (dedup and texts[j] == texts[i]))
        )

    l1 = sum(term(regions[i], descs, i, allowed_r2d(i)) for i in rows) / len(rows)
    if not symmetric:
        return l1
    l2 = sum(term(descs[i], regions, i, allowed_d2r(i)) for i in rows) / len(rows)
    return 0.5 * (l1 + l2)


@pytest.mark.parametrize("dedup", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_region_loss_matches_loop(dedup: bool, symmetric: bool) -> None:
    texts = [
        "red circle",
        "blue square",
        "red circle",
        "pad",
        "green star",
        "blue square",
        "tiny dot",
        "pad",
    ]
    valid = [True, True, True, False, True, True, True, False]
    matched = [True, True, True, False, True, False, True, False]  # slot 5 unmatched (Q < R)
    vocab = {t: k for k, t in enumerate(sorted(set(texts)))}
    tokens = torch.tensor([[vocab[t] + 1, 0] for t in texts])
    g = torch.Generator().manual_seed(0)
    regions = F.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=-1)
    descs = F.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=-1)
    scale = 3.0
    got = region_description_loss(
        regions, descs, torch.tensor(matched), torch.tensor(valid), scale, tokens,
        dedup=dedup, symmetric=symmetric,
    )  # fmt: skip
    ref = naive(regions, descs, matched, valid, scale, texts, dedup, symmetric)
    assert got.item() == pytest.approx(ref, rel=1e-9)


def test_duplicates_are_not_negatives() -> None:
    """With identical descriptions, dedup gives the loss of a batch without the duplicate."""
    d = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    descs = torch.stack([d[0], d[1], d[0]])
    regions = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    tok = torch.tensor([[1], [2], [1]])
    ones = torch.ones(3, dtype=torch.bool)
    with_dup = region_description_loss(regions, descs, ones, ones, 1.0, tok, dedup=True)

    # row 0 (and 2) sees only {itself, "2"}; compute directly
    def ce(i: int, cols: list[int]) -> float:
        logits = torch.stack([regions[i] @ descs[j] for j in cols])
        return -torch.log_softmax(logits, 0)[0].item()

    ref = (ce(0, [0, 1]) + ce(1, [1, 0, 2]) + ce(2, [2, 1])) / 3
    assert with_dup.item() == pytest.approx(ref, rel=1e-9)
    no_dedup = region_description_loss(regions, descs, ones, ones, 1.0, tok, dedup=False)
    assert no_dedup.item() > with_dup.item(), "duplicates as negatives must cost more"


def test_text_ids_and_empty() -> None:
    ids = text_ids(torch.tensor([[1, 2], [3, 4], [1, 2]]))
    assert ids[0] == ids[2] and ids[0] != ids[1]
    regions = torch.randn(4, 3, requires_grad=True)
    z = region_description_loss(
        regions,
        torch.randn(4, 3),
        torch.zeros(4, dtype=torch.bool),
        torch.ones(4, dtype=torch.bool),
        1.0,
        torch.zeros(4, 2, dtype=torch.long),
    )
    z.backward()
    assert z.item() == 0.0
    with pytest.raises(ValueError, match="desc_tokens"):
        region_description_loss(
            regions, regions, torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool), 1.0
        )
