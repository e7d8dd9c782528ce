"""Attribute hard negatives (FG-OVD style): metrics against hand-computed answers, the FG-OVD
benchmark JSON and the JSONL layout written in the test, bad input counted, the built-in
version against the generator's ground truth (oracle 100 %, random near chance), the CLI."""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finegrain.data.synthetic_render import COLOR_RGB
from finegrain.eval.common import EvalContext, eval_transform
from finegrain.eval.config import EvalTaskConfig
from finegrain.eval.hardneg import HardNegData, HardNegItem, evaluate_hardneg, hardneg_metrics
from finegrain.eval.hardneg_data import (
    ATTRIBUTES,
    hardneg_scene,
    load_fgovd,
    load_hardneg_jsonl,
    phrase,
    synthetic_hardneg,
)
from finegrain.eval.pairs import crop_box
from finegrain.methods.base import Method

from helpers.eval_toy import COLORS, ToyConfig, ToyMethod


def test_metrics_hand_computed_with_ties_as_errors():
    items = [
        HardNegItem(0, None, "p", ["a", "b", "c"], [1, 1, 2], ["color", "size", "color+size"]),
        HardNegItem(0, None, "p", ["a", "b", "c"], [1, 1, 2], ["color", "size", "color+size"]),
        HardNegItem(0, None, "p", ["a", "b"], [1, 2], ["color", "color+shape"]),
    ]
    scores = [
        torch.tensor([0.9, 0.1, 0.2, 0.3]),  # right everywhere
        torch.tensor([0.5, 0.1, 0.7, 0.5]),  # size negative wins, diff-2 negative ties
        torch.tensor([0.4, 0.4, 0.1]),  # tie with the colour negative
    ]
    m, chance = hardneg_metrics(scores, items)
    assert m["acc1"] == pytest.approx(1 / 3)
    assert m["mean_rank"] == pytest.approx((1 + 3 + 2) / 3)
    assert m["acc1_diff1"] == pytest.approx(1 / 3)  # item 1 loses to b, item 2 ties with a
    assert m["acc1_diff2"] == pytest.approx(2 / 3)  # item 1 ties with c
    assert m["acc1_color"] == pytest.approx(2 / 3)  # only single-kind negatives enter
    assert m["acc1_size"] == pytest.approx(1 / 2)
    assert "acc1_color+size" not in m and "acc1_shape" not in m
    assert chance["acc1"] == pytest.approx((1 / 4 + 1 / 4 + 1 / 3) / 3)
    assert chance["acc1_diff1"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 2) / 3)
    assert chance["acc1_color"] == chance["acc1_size"] == pytest.approx(1 / 2)


# ---- real layouts -------------------------------------------------------------------------
def _two_squares(path) -> None:
    """64 x 48: a red square at x 4..23, a blue one at x 36..55, both at y 10..29."""
    arr = np.full((48, 64, 3), 128, np.uint8)
    arr[10:30, 4:24] = COLORS["red"]
    arr[10:30, 36:56] = COLORS["blue"]
    Image.fromarray(arr).save(path)


def _fgovd_fixture(tmp_path):
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    _two_squares(root / "val2017" / "1.jpg")
    cats = ["A red square.", "A blue square.", "A green square.", "A yellow square."]
    ann = lambda i, img, box, pos, negs: {  # noqa: E731
        "id": i, "image_id": img, "bbox": box, "category_id": pos, "neg_category_ids": negs,
    }  # fmt: skip
    raw = {
        "images": [
            {"id": 1, "file_name": "val2017/1.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "val2017/missing.jpg", "width": 64, "height": 48},
        ],
        "annotations": [
            ann(1, 1, [4, 10, 20, 20], 0, [1, 2]),  # red box: "red" wins
            ann(2, 1, [36, 10, 20, 20], 1, [0, 3]),  # blue box: "blue" wins
            ann(3, 1, [36, 10, 20, 20], 3, [1, 2]),  # blue box described as yellow: a miss
            ann(4, 1, [4, 10, 20, 20], 0, []),  # no negatives
            ann(5, 1, [100, 60, 10, 10], 0, [1]),  # box outside the 64 x 48 image
            ann(6, 2, [4, 10, 20, 20], 0, [1]),  # image missing on disk
        ],
        "categories": [{"id": i, "name": n, "synset": ""} for i, n in enumerate(cats)],
    }
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "1_attributes.json").write_text(json.dumps(raw))
    return bench, root


class _DotConditioned(ToyMethod):
    def score_features(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        return image_feats @ text_feats.t()


def test_fgovd_benchmark_layout_crops_and_counts(tmp_path):
    bench, root = _fgovd_fixture(tmp_path)
    data = load_fgovd(bench, str(root), "1_attributes")
    assert data.skipped == {"missing_image": 1} and len(data.items) == 5
    assert data.items[0].box == pytest.approx((4 / 64, 10 / 48, 24 / 64, 30 / 48))
    assert data.items[0].positive == "A red square." and data.items[0].diffs == [1, 1]
    ctx = EvalContext.create(ToyMethod(), progress=False)
    # num_negatives=0: every negative (the fixture's boxes have fewer than FG-OVD's 10)
    cfg = EvalTaskConfig(task="hardneg", dataset="fgovd", batch_size=2, crop_margin=0.0,
                         num_negatives=0)  # fmt: skip
    m, art = evaluate_hardneg(ctx, cfg, data)
    assert m["acc1"] == pytest.approx(2 / 3) and m["acc1_diff1"] == pytest.approx(2 / 3)
    assert m["skipped_no_negatives"] == 1 and m["skipped_box_outside"] == 1
    assert m["skipped_missing_image"] == 1 and "skipped_few_negatives" not in m
    p = art["protocol"]
    assert (p["n_images"], p["n_boxes"], p["n_negatives"], p["region"]) == (1, 3, 2, "crop")
    assert p["chance"]["acc1"] == pytest.approx(1 / 3) and p["skipped_no_negatives"] == 1
    assert p["benchmark"] == "FG-OVD hard (1_attributes)" and p["difficulty_levels"] == [1]
    # text-conditioned scoring path (a dot product routed through score_features): same answer
    cond = replace(cfg, scoring="conditioned")
    mc, ac = evaluate_hardneg(EvalContext.create(_DotConditioned(), progress=False), cond, data)
    torch.testing.assert_close(torch.cat(ac["scores"]), torch.cat(art["scores"]), atol=1e-6, rtol=0)
    assert mc["acc1"] == m["acc1"] and ac["protocol"]["scoring"] == "conditioned"
    # the whole image holds both colours: the box no longer decides
    whole = replace(cfg, region="image", crop_margin=0.1)
    assert evaluate_hardneg(ctx, whole, data)[0]["acc1"] < 2 / 3
    # FG-OVD's ranks.py keeps boxes with >= N negatives
    m2, _ = evaluate_hardneg(ctx, EvalTaskConfig(task="hardneg", num_negatives=2), data)
    assert m2["skipped_few_negatives"] == 1 and m2["acc1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="crop_margin must be >= 0 and num_negatives >= -1"):
        evaluate_hardneg(ctx, EvalTaskConfig(task="hardneg", crop_margin=-0.1), data)
    with pytest.raises(ValueError, match="'few_negatives': 4.*num_negatives=3; 0 = all"):
        evaluate_hardneg(ctx, EvalTaskConfig(task="hardneg", num_negatives=3), data)


def test_roialign_pools_each_box_from_one_dense_map(tmp_path):
    """region=roialign: one dense_features forward per image; a grid-aligned box with one bin
    per token cell pools exactly the mean of its cells (naive reference), a whole-image query
    the mean of the map; the FG-OVD fixture's boxes are told apart as by the crop."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    box = (0.25, 0.5, 0.75, 1.0)  # token cells: columns 1..2, rows 2..3 of the 4 x 4 grid
    data = HardNegData([img], [HardNegItem(0, box, "red", ["blue", "green"])])
    calls = []

    class Counted(ToyMethod):
        def dense_features(self, images):
            calls.append(len(images))
            return super().dense_features(images)

    ctx = EvalContext.create(Counted(), progress=False)
    cfg = EvalTaskConfig(task="hardneg", region="roialign", roi_size=2, crop_margin=0.0)
    _, art = evaluate_hardneg(ctx, cfg, data)
    x = eval_transform(32, ctx.mean, ctx.std, crop=False)(img)[None].double()
    toy = ToyMethod().double()
    dense = toy.dense_features(x)[0]  # (D, 4, 4)
    pooled = F.normalize(dense[:, 2:4, 1:3].mean((1, 2)), dim=0)
    text = toy.encode_text(toy.tokenize(["red", "blue", "green"]))
    want = (text @ pooled).float()
    torch.testing.assert_close(art["scores"][0], want, atol=1e-5 * float(want.abs().max()), rtol=0)
    assert art["protocol"]["region"] == "roialign" and art["protocol"]["roi_size"] == 2
    whole = HardNegData([img, img], [HardNegItem(0, None, "red", ["blue"])] * 2)
    _, art = evaluate_hardneg(
        ctx, EvalTaskConfig(task="hardneg", region="roialign", roi_size=4), whole
    )
    want = (text[:2] @ F.normalize(dense.mean((1, 2)), dim=0)).float()
    torch.testing.assert_close(art["scores"][0], want, atol=1e-5 * float(want.abs().max()), rtol=0)
    bench, root = _fgovd_fixture(tmp_path)  # 3 boxes of one image: one forward
    calls.clear()
    fg = load_fgovd(bench, str(root), "1_attributes")
    cfg = EvalTaskConfig(task="hardneg", dataset="fgovd", region="roialign", crop_margin=0.0,
                         num_negatives=0)  # fmt: skip
    m, _ = evaluate_hardneg(ctx, cfg, fg)
    assert m["acc1"] == pytest.approx(2 / 3) and calls == [1]
    cond = replace(cfg, scoring="conditioned")
    with pytest.raises(ValueError, match="roialign scores globally only"):
        evaluate_hardneg(EvalContext.create(_DotConditioned(), progress=False), cond, fg)


def test_jsonl_layout_pixel_and_normalised_boxes(tmp_path):
    _two_squares(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "bad.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    lines = [
        {"image": "a.png", "bbox": [4, 10, 20, 20], "caption": "a red square",
         "neg_captions": ["a blue square", "a green square"], "neg_kinds": ["color", "color"]},
        {"image": "a.png", "box": [36 / 64, 10 / 48, 56 / 64, 30 / 48],
         "captions": ["a blue square"], "neg_captions": ["a red square"]},
        {"image": "a.png", "box": [0.6, 0.2, 0.9, 0.7], "caption": "a yellow square",
         "neg_captions": ["a yellow square"]},  # the only negative equals the positive
        {"image": "nope.png", "caption": "x", "neg_captions": ["y"]},
        {"image": "bad.png", "caption": "a red square", "neg_captions": ["a blue square"]},
    ]  # fmt: skip
    text = "\n".join(json.dumps(x) for x in lines) + "\n{not json\n"
    (tmp_path / "boxes.jsonl").write_text(text)
    data = load_hardneg_jsonl(tmp_path / "boxes.jsonl", "")
    assert data.skipped == {"missing_image": 1, "bad_line": 1} and len(data.items) == 4
    assert data.items[0].box == pytest.approx((4 / 64, 10 / 48, 24 / 64, 30 / 48))
    assert data.items[3].box is None
    ctx = EvalContext.create(ToyMethod(), progress=False)
    m, art = evaluate_hardneg(ctx, EvalTaskConfig(task="hardneg", dataset="jsonl"), data)
    assert m["acc1"] == 1.0 and m["acc1_color"] == 1.0
    assert m["skipped_unreadable_image"] == 1 and m["skipped_no_negatives"] == 1
    assert m["skipped_negative_same_as_positive"] == 1 and m["skipped_bad_line"] == 1
    assert art["protocol"]["n_boxes"] == 2 and art["protocol"]["negatives"] == "color"


def test_crop_box_pixels():
    img = Image.fromarray(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3))
    c = crop_box(img, (4 / 64, 10 / 48, 24 / 64, 30 / 48), 0.0)
    assert np.array_equal(np.asarray(c), np.asarray(img)[10:30, 4:24])
    c = crop_box(img, (4 / 64, 10 / 48, 24 / 64, 30 / 48), 0.5)  # 10 px more each side, clipped
    assert np.array_equal(np.asarray(c), np.asarray(img)[0:40, 0:34])


# ---- built-in version vs the generator's ground truth -------------------------------------
def test_builtin_negatives_differ_exactly_as_labelled():
    data = synthetic_hardneg("regions", 12, 64)
    objects = [o for i in range(12) for o in hardneg_scene("regions", i, 64)["objects"]]
    assert len(objects) == len(data.items) > 12
    texts = {phrase(dict(zip(ATTRIBUTES, v))): v for v in _all_attribute_tuples()}
    for it, o in zip(data.items, objects):
        truth = tuple(o[k] for k in ATTRIBUTES)
        assert texts[it.positive] == truth and it.box == tuple(o["box"])
        assert len(set(it.negatives)) == len(it.negatives) == 16
        for neg, d, kinds in zip(it.negatives, it.diffs, it.kinds):
            changed = [k for k, a, b in zip(ATTRIBUTES, texts[neg], truth) if a != b]
            assert len(changed) == d and "+".join(sorted(changed)) == kinds


def _all_attribute_tuples():
    import itertools

    return itertools.product(*ATTRIBUTES.values())


def test_builtin_crops_hold_their_object():
    """A crop of a solid object's box is mostly that object's colour (the boxes are exact)."""
    checked = 0
    for i in range(16):
        scene = hardneg_scene("regions", i, 64)
        for o in scene["objects"]:
            if o["pattern"] != "solid":
                continue
            px = np.asarray(crop_box(scene["image"], tuple(o["box"]), 0.0)).reshape(-1, 3)
            near = np.abs(px.astype(int) - COLOR_RGB[o["color"]]).max(1) <= 16
            assert near.mean() > 0.3, (i, o)
            checked += 1
    assert checked >= 5


class _Oracle(Method):
    """Image embedding = one-hot blocks of the true attributes of the object whose crop (or
    whole single-object image) it sees, looked up by the exact pixels of the evaluation
    transform; text embedding = the same blocks parsed from the words."""

    Config = ToyConfig

    def __init__(self, truth: dict[bytes, tuple[str, ...]]) -> None:
        super().__init__(ToyConfig())
        self.truth = truth
        self.vocab = [(k, v) for k, vals in ATTRIBUTES.items() for v in vals]

    @staticmethod
    def key(t: torch.Tensor) -> bytes:
        return hashlib.sha1(t.contiguous().numpy().tobytes()).digest()

    def onehot(self, attrs: tuple[str, ...]) -> torch.Tensor:
        v = torch.zeros(len(self.vocab))
        for k, a in zip(ATTRIBUTES, attrs):
            v[self.vocab.index((k, a))] = 1.0
        return v

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        words = [t.split() for t in texts]
        return torch.stack([self.onehot(_parse(w)) for w in words])

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize(
            torch.stack([self.onehot(self.truth[self.key(x)]) for x in images]), dim=-1
        )

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize(tokens, dim=-1)


def _parse(words: list[str]) -> tuple[str, ...]:
    return tuple(next(w for w in words if w in ATTRIBUTES[k]) for k in ATTRIBUTES)


class _Random(_Oracle):
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        seeds = [zlib.crc32(self.key(x)) for x in images]
        return torch.stack(
            [torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in seeds]
        )

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([zlib.crc32(t.encode()) for t in texts])

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(int(s)) for s in tokens]
        return torch.stack([torch.randn(8, generator=g) for g in gens])


@pytest.mark.parametrize("variant", ["regions", "single"])
def test_builtin_oracle_scores_100_and_random_near_chance(variant):
    n, size = 48, 32
    data = synthetic_hardneg(variant, n, size)
    ctx = EvalContext.create(_Oracle({}), progress=False)
    whole = eval_transform(size, ctx.mean, ctx.std, crop=True)
    region = eval_transform(size, ctx.mean, ctx.std, crop=False)
    truth = {}
    for i in range(n):  # the generator's objects, keyed by the pixels the task will show
        scene = hardneg_scene(variant, i, size)
        for o in scene["objects"]:
            x = (
                whole(scene["image"])
                if variant == "single"
                else region(crop_box(scene["image"], tuple(o["box"]), 0.1))
            )
            truth[_Oracle.key(x)] = tuple(o[k] for k in ATTRIBUTES)
    cfg = EvalTaskConfig(task="hardneg", variant=variant, batch_size=16)
    ctx.method = _Oracle(truth)
    m, art = evaluate_hardneg(ctx, cfg, data)
    assert art["protocol"]["region"] == ("image" if variant == "single" else "crop")
    assert art["protocol"]["negatives"] == "color,pattern,shape,size"
    keys = ["acc1", "acc1_diff1", "acc1_diff2", "acc1_diff3", "acc1_color", "acc1_pattern"]
    keys += ["acc1_size", "acc1_shape"]
    assert all(m[k] == 1.0 for k in keys) and m["mean_rank"] == 1.0, m
    ctx.method = _Random(truth)
    m, art = evaluate_hardneg(ctx, cfg, data)
    chance = art["protocol"]["chance"]
    assert chance["acc1"] == pytest.approx(1 / 17) and chance["acc1_color"] == pytest.approx(1 / 3)
    n_boxes = art["protocol"]["n_boxes"]
    for k in ("acc1", "acc1_diff1", "acc1_color", "mean_rank"):
        sd = (
            (chance[k] * (1 - chance[k]) / n_boxes) ** 0.5
            if k != "mean_rank"
            else 4.9 / n_boxes**0.5
        )
        assert abs(m[k] - chance[k]) < 4 * sd, (k, m[k], chance[k])


def test_cli_runs_builtin_hardneg_and_compositional(tmp_path, capsys):
    from safetensors.torch import save_file

    from finegrain.config import save_yaml
    from finegrain.eval_cli import main
    from finegrain.run_config import RunConfig

    from helpers.eval_toy import register_toy

    register_toy()
    run = tmp_path / "run"
    run.mkdir()
    save_yaml(RunConfig(name="toy", method=ToyConfig()), run / "config.yaml")
    save_file(
        {k: v.contiguous() for k, v in ToyMethod().state_dict().items()},
        str(run / "model.safetensors"),
    )
    tasks = "hardneg:synthetic@num_samples=8,compositional:synthetic@num_samples=8"
    rc = main(["--checkpoint", str(run), "--tasks", tasks, "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "o" / "results.json").read_text())["toy"]
    assert 0 <= res["hardneg/synthetic/acc1"] <= 1 and "hardneg/synthetic/acc1_diff3" in res
    assert 0 <= res["compositional/synthetic/acc_swap_att"] <= 1
    cards = json.loads((tmp_path / "o" / "protocol.json").read_text())["toy"]
    hn, cp = cards["hardneg/synthetic"], cards["compositional/synthetic"]
    assert hn["n_images"] == 8 and hn["n_boxes"] > 8 and hn["region"] == "crop"
    assert hn["chance"]["acc1"] == pytest.approx(1 / 17) and hn["settings"]["crop_margin"] == 0.1
    assert cp["n_pairs"] > 8 and cp["chance"]["acc_swap_att"] == 0.5
    table = (tmp_path / "o" / "results.md").read_text()
    assert f"| hardneg/synthetic | acc1 (%) | 8 / {hn['n_boxes']} | 5.88 |" in table
    rc = main(["--checkpoint", str(run), "--tasks", "hardneg:synthetic/nope", "--quiet"])
    assert rc == 2 and "synthetic hardneg variant 'nope'" in capsys.readouterr().err
