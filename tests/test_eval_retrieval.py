"""Retrieval: ranks vs a naive reference, chunked text-conditioned scoring vs a pair loop,
re-ranking semantics, end-to-end on a fixture manifest, Flickr8k test loader."""

from __future__ import annotations

import json

import pytest
import torch

from finegrain.eval import run_tasks
from finegrain.eval.common import EvalContext, chunk_sizes, chunked_scores
from finegrain.eval.config import EvalTaskConfig
from finegrain.eval.datasets import load_task_data
from finegrain.eval.retrieval import rank_metrics, rerank_key, retrieval_ranks, topk_mask

from helpers.eval_toy import (
    COLORS,
    ConditionedToy,
    PlainToy,
    ToyMethod,
    color_image,
    naive_conditioned,
)


def naive_ranks(scores: torch.Tensor, owner: list[int]) -> tuple[list[int], list[int]]:
    """Stable descending sort per query; I2T takes the best-placed ground-truth text."""
    ni, nt = scores.shape
    t2i = []
    for t in range(nt):
        order = sorted(range(ni), key=lambda i: (-scores[i, t].item(), i))
        t2i.append(order.index(owner[t]) + 1)
    i2t = []
    for i in range(ni):
        order = sorted(range(nt), key=lambda t: (-scores[i, t].item(), t))
        i2t.append(min(order.index(t) + 1 for t in range(nt) if owner[t] == i))
    return t2i, i2t


def test_ranks_match_naive_reference_with_ties():
    g = torch.Generator().manual_seed(1)
    owner = [i // 3 for i in range(21)] + [2, 5]  # 7 images with 3 texts, two with a 4th
    scores = torch.randint(0, 4, (7, len(owner)), generator=g).float()  # many ties
    t2i, i2t = retrieval_ranks(scores, torch.tensor(owner), rows_per_chunk=4)
    ref_t2i, ref_i2t = naive_ranks(scores, owner)
    assert t2i.tolist() == ref_t2i
    assert i2t.tolist() == ref_i2t


def test_rank_metrics_values():
    m = rank_metrics(torch.tensor([1, 2, 6, 20]), torch.tensor([1, 1, 11]))
    assert m["image_retrieval_recall@1"] == pytest.approx(0.25)
    assert m["image_retrieval_recall@5"] == pytest.approx(0.5)
    assert m["image_retrieval_recall@10"] == pytest.approx(0.75)
    assert m["image_retrieval_mean_rank"] == pytest.approx(29 / 4)
    assert m["text_retrieval_recall@10"] == pytest.approx(2 / 3)
    assert m["text_retrieval_median_rank"] == 1


def test_chunk_sizes_fill_budget_and_never_exceed_it():
    assert chunk_sizes(1000, 5000, 1, 10**9) == (1000, 5000)
    ci, ct = chunk_sizes(1000, 5000, 1000, 50 * 2**20)
    assert ct == 5000 and ci > 1 and ci * ct * 1000 <= 50 * 2**20
    assert chunk_sizes(10, 10, 10**12, 1) == (1, 1)


@pytest.mark.parametrize("budget_mb", [0, 1, 64])
def test_chunked_conditioned_scores_equal_pair_loop(budget_mb):
    m = ConditionedToy().eval()
    g = torch.Generator().manual_seed(2)
    img_f = torch.randn(9, 16, 16, generator=g)  # (Ni, N, D)
    txt_f = torch.nn.functional.normalize(torch.randn(13, 16, generator=g), dim=-1)
    ctx = EvalContext.create(m, progress=False)
    got = chunked_scores(ctx, img_f, txt_f, budget_mb)
    assert torch.allclose(got, naive_conditioned(m, img_f, txt_f), atol=1e-5)


def test_rerank_key_orders_candidates_first_by_conditioned_score():
    glob = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    cond = torch.tensor([[0.1, 0.5, float("nan"), float("nan")]])
    cand = topk_mask(glob, 2)
    key = rerank_key(glob, cond, cand)
    order = key[0].argsort(descending=True).tolist()
    assert order == [1, 0, 2, 3]


def write_manifest(tmp_path, n_per_color: int = 3) -> str:
    rows = []
    (tmp_path / "img").mkdir(parents=True)
    for k, c in enumerate(COLORS):
        for j in range(n_per_color):
            name = f"img/{c}_{j}.png"
            color_image(c, seed=10 * k + j).save(tmp_path / name)
            rows.append(
                {"image": name, "captions": [f"a {c} picture", f"{c} square {j}"], "split": "test"}
            )
    path = tmp_path / "captions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _task(path: str, **kw) -> EvalTaskConfig:
    return EvalTaskConfig(task="retrieval", dataset="manifest", path=path, batch_size=5, **kw)


def test_run_tasks_global_conditioned_rerank(tmp_path):
    path = write_manifest(tmp_path)
    m = ConditionedToy()
    tasks = [
        _task(path),
        _task(path, scoring="conditioned"),
        _task(path, scoring="rerank", rerank_k=3),
        _task(path, scoring="rerank", rerank_k=100),
    ]
    res = run_tasks(m, tasks, progress=False)
    assert m.training, "run_tasks must restore train mode"
    g = "retrieval/manifest/"
    for prefix in (g, g + "conditioned/", g + "rerank+k3/", g + "rerank+k100/"):
        r1, r10 = (
            res[prefix + "image_retrieval_recall@1"],
            res[prefix + "image_retrieval_recall@10"],
        )
        assert 0.0 <= r1 <= r10 <= 1.0
        # by colour the toy finds the right group of 3 images: far above chance (1/18)
        assert res[prefix + "image_retrieval_recall@5"] > 0.6, (prefix, res)
    # re-ranking every candidate is exactly conditioned scoring
    for k in ("image_retrieval_recall@1", "text_retrieval_recall@1", "image_retrieval_mean_rank"):
        assert res[g + "rerank+k100/" + k] == pytest.approx(res[g + "conditioned/" + k])


def test_rerank_with_k1_keeps_global_top1(tmp_path):
    path = write_manifest(tmp_path, 2)
    res = run_tasks(
        ConditionedToy(), [_task(path), _task(path, scoring="rerank", rerank_k=1)], progress=False
    )
    for k in ("image_retrieval_recall@1", "text_retrieval_recall@5", "image_retrieval_mean_rank"):
        assert res[f"retrieval/manifest/rerank+k1/{k}"] == pytest.approx(
            res[f"retrieval/manifest/{k}"]
        )


def test_conditioned_scoring_needs_score_features(tmp_path):
    path = write_manifest(tmp_path, 1)
    with pytest.raises(ValueError, match=r"method 'toy'.*score_features.*retrieval/manifest"):
        run_tasks(PlainToy(), [_task(path, scoring="conditioned")], progress=False)
    with pytest.raises(ValueError, match="valid choices: global, conditioned, rerank"):
        run_tasks(ToyMethod(), [_task(path, scoring="best")], progress=False)


def test_missing_image_is_named(tmp_path):
    path = write_manifest(tmp_path, 1)
    (tmp_path / "img" / "red_0.png").unlink()
    with pytest.raises(ValueError, match=r"red_0\.png.*captions\.jsonl"):
        load_task_data(_task(path))


@pytest.mark.realdata
def test_flickr8k_test_split(flickr8k_dir):
    cfg = EvalTaskConfig(task="retrieval", dataset="flickr8k", path=str(flickr8k_dir))
    data = load_task_data(cfg)
    assert len(data.images) == 1000 and len(data.texts) == 5000
    assert torch.bincount(torch.tensor(data.text_to_image)).eq(5).all()
    res = run_tasks(
        ToyMethod(),
        [EvalTaskConfig(task="retrieval", dataset="flickr8k", path=str(flickr8k_dir), limit=40)],
        progress=False,
    )
    assert 0 < res["retrieval/flickr8k/text_retrieval_recall@10"] <= 1


class TowerTokToy(ToyMethod):
    """Tokenises like the real methods: ``self.text.tokenizer`` (a CLIP BPE tokenizer)."""

    def __init__(self) -> None:
        super().__init__()
        from finegrain.data.tokenizers import ClipTokenizer

        self.text = torch.nn.Module()
        self.text.tokenizer, self.text.pad_id = ClipTokenizer(16), 0

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.text.tokenizer(texts)

    def encode_text(self, tokens, normalize=True):
        return super().encode_text(tokens % 512, normalize)


def test_context_length_truncates_through_the_tower_tokenizer(tmp_path):
    from finegrain.eval.common import tokenize

    m = TowerTokToy()
    ctx = EvalContext.create(m, progress=False)
    text = "a very long caption " * 10
    full, short = tokenize(ctx, [text]), tokenize(ctx, [text], context_length=6)
    assert full.shape == short.shape == (1, 16)
    assert short[0, :5].tolist() == full[0, :5].tolist()
    assert short[0, 5].item() == m.text.tokenizer.eot_id and short[0, 6:].eq(0).all()
    with pytest.raises(ValueError, match="exceeds the 16 positions"):
        tokenize(ctx, [text], context_length=77)
    with pytest.raises(ValueError, match="cannot tokenize to context_length=8"):
        tokenize(EvalContext.create(ToyMethod(), progress=False), ["x"], context_length=8)
    path = write_manifest(tmp_path, 1)
    res = run_tasks(m, [_task(path, context_length=4)], progress=False)
    assert "retrieval/manifest/ctx4/image_retrieval_recall@1" in res


def test_default_budget_batches_many_images_for_a_flair_sized_head():
    from finegrain.eval.common import pair_bytes

    img, txt = torch.zeros(2, 197, 512), torch.zeros(2, 512)  # ViT-B/16 tokens, D = 512
    ci, ct = chunk_sizes(1000, 5000, pair_bytes(img, txt), 1024 * 2**20)
    assert ct == 5000 and ci >= 8, (ci, ct)  # never one image at a time at the default budget
