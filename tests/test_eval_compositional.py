"""Compositionality: pair accuracy and Winoground scores against hand-computed answers, the
SugarCrepe and Winoground layouts written in the test, bad input counted, conditioned scoring
equal to global for a dot-product score, and the built-in version against the generator's
ground truth (an oracle that checks captions against the scene's objects scores 100 %, a random
score lands near chance)."""

from __future__ import annotations

import hashlib
import json
import zlib

import pytest
import torch

from finegrain.eval import run_tasks
from finegrain.eval.common import EvalContext, eval_transform
from finegrain.eval.compositional import (
    evaluate_compositional,
    pair_accuracy,
    winoground_scores,
)
from finegrain.eval.compositional_data import (
    RELATIONS,
    load_sugarcrepe,
    load_winoground,
    pair_scenes,
    synthetic_pairs,
    synthetic_winoground,
    winoground_scenes,
)
from finegrain.eval.config import EvalTaskConfig
from finegrain.eval.report import markdown_table
from finegrain.methods.base import Method

from helpers.eval_toy import ToyConfig, ToyMethod, color_image


def test_pair_accuracy_hand_computed():
    pos = torch.tensor([0.9, 0.5, 0.5, 0.2, 0.7])
    neg = torch.tensor([0.1, 0.5, 0.6, 0.1, 0.8])  # the tie is an error
    m, counts = pair_accuracy(
        pos, neg, ["swap_att", "swap_att", "swap_att", "replace_rel", "replace_rel"]
    )
    assert m["acc_swap_att"] == pytest.approx(1 / 3) and m["acc_replace_rel"] == 0.5
    assert m["acc"] == pytest.approx((1 / 3 + 1 / 2) / 2) and counts == {
        "replace_rel": 2,
        "swap_att": 3,
    }


def test_winoground_scores_hand_made_matrix():
    s = torch.tensor(
        [
            [[0.9, 0.1], [0.2, 0.8]],  # s[c, i]: all right
            [[0.9, 0.8], [0.7, 0.6]],  # caption 0 wins everywhere: text no, image no
            [[0.5, 0.4], [0.1, 0.3]],  # text: .5>.1, .3>.4 no; image: .5>.4, .3>.1 yes
            [[0.4, 0.5], [0.3, 0.6]],  # text: .4>.3, .6>.5 yes; image: .4>.5 no
            [[0.5, 0.5], [0.1, 0.9]],  # tie in the image comparison: image no, text yes
        ]
    )
    m = winoground_scores(s, ["Object", "Object", "Relation", "Relation", "Both"])
    assert m["text_score"] == pytest.approx(3 / 5) and m["image_score"] == pytest.approx(2 / 5)
    assert m["group_score"] == pytest.approx(1 / 5)
    assert m["text_score_object"] == 0.5 and m["image_score_object"] == 0.5
    assert m["group_score_relation"] == 0.0 and m["image_score_relation"] == 0.5
    assert m["text_score_both"] == 1.0
    assert m["image_score_both"] == 0.0 and m["group_score_object"] == 0.5


def _ctx(method: Method | None = None) -> EvalContext:
    return EvalContext.create(method or ToyMethod(), progress=False)


def test_sugarcrepe_layout_with_toy_colours(tmp_path):
    coco = tmp_path / "val2017"
    coco.mkdir()
    for c in ("red", "blue", "green"):
        color_image(c).save(coco / f"{c}.jpg")
    entry = lambda f, c, n: {"filename": f, "caption": c, "negative_caption": n}  # noqa: E731
    data_dir = tmp_path / "sugarcrepe"
    data_dir.mkdir()
    swap = {
        "0": entry("red.jpg", "a red thing", "a blue thing"),  # right
        "1": entry("blue.jpg", "a blue thing", "a red thing"),  # right
        "2": entry("green.jpg", "a red thing", "a green thing"),  # wrong caption: miss
        "3": entry("gone.jpg", "a red thing", "a blue thing"),  # missing image
    }
    rel = {
        "0": entry("green.jpg", "a green thing", "a yellow thing"),  # right
        "1": entry("red.jpg", "a red thing", "a red thing"),  # negative == caption
    }
    (data_dir / "swap_att.json").write_text(json.dumps(swap))
    (data_dir / "replace_rel.json").write_text(json.dumps(rel))
    data = load_sugarcrepe(data_dir, str(coco))
    assert len(data.images) == 3 and len(data.items) == 5 and data.skipped == {"missing_image": 1}
    cfg = EvalTaskConfig(task="compositional", dataset="sugarcrepe", batch_size=2)
    m, art = evaluate_compositional(_ctx(), cfg, data)
    assert m["acc_swap_att"] == pytest.approx(2 / 3) and m["acc_replace_rel"] == 1.0
    assert m["acc"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["skipped_missing_image"] == 1 and m["skipped_no_negatives"] == 1
    assert m["skipped_negative_same_as_positive"] == 1
    p = art["protocol"]
    assert (p["n_images"], p["n_pairs"], p["n_negatives"]) == (3, 4, 1) and "n_groups" not in p
    assert p["chance"] == {"acc_swap_att": 0.5, "acc_replace_rel": 0.5, "acc": 0.5}
    only = load_sugarcrepe(data_dir, str(coco), variant="replace_rel")
    assert {k for it in only.items for k in it.kinds} == {"replace_rel"}
    with pytest.raises(ValueError, match="did you mean 'swap_att'"):
        load_sugarcrepe(data_dir, str(coco), variant="swap_at")


def test_winoground_layout_with_toy_colours(tmp_path):
    (tmp_path / "images").mkdir()
    for name, c in (("ex_0_img_0", "red"), ("ex_0_img_1", "blue"), ("ex_1_img_0", "green")):
        color_image(c).save(tmp_path / "images" / f"{name}.png")
    color_image("yellow").save(tmp_path / "images" / "ex_1_img_1.png")
    rows = [
        {"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1", "caption_0": "red thing",
         "caption_1": "blue thing", "collapsed_tag": "Object"},  # all right
        {"id": 1, "image_0": "ex_1_img_0", "image_1": "ex_1_img_1", "caption_0": "yellow thing",
         "caption_1": "green thing", "collapsed_tag": "Relation"},  # captions swapped: all wrong
        {"id": 2, "image_0": "ex_2_img_0", "image_1": "ex_0_img_1", "caption_0": "a",
         "caption_1": "b", "collapsed_tag": "Both"},  # missing image
    ]  # fmt: skip
    (tmp_path / "examples.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_winoground(tmp_path, "")
    assert len(data.groups) == 2 and data.skipped == {"missing_image": 1}
    cfg = EvalTaskConfig(task="compositional", dataset="winoground")
    m, art = evaluate_compositional(_ctx(), cfg, data)
    for k in ("text_score", "image_score", "group_score"):
        assert m[k] == 0.5 and m[f"{k}_object"] == 1.0 and m[f"{k}_relation"] == 0.0
    assert m["skipped_missing_image"] == 1
    p = art["protocol"]
    assert p["n_groups"] == 2 and p["n_images"] == 4 and "n_pairs" not in p
    assert (
        p["chance"]["group_score"] == pytest.approx(1 / 6)
        and p["chance"]["text_score_object"] == 0.25
    )


def test_winoground_names_with_images_prefix_and_group_counts_in_the_table(tmp_path):
    """Winoground's release layout (examples.jsonl + images/) where some names already say
    ``images/``: found with the default and with image_root=; the report's N column counts the
    groups a score averages over (per tag for the per-tag scores), not the texts."""
    (tmp_path / "images").mkdir()
    for g, (c0, c1) in enumerate((("red", "blue"), ("green", "yellow"), ("blue", "red"))):
        color_image(c0).save(tmp_path / "images" / f"ex_{g}_img_0.png")
        color_image(c1).save(tmp_path / "images" / f"ex_{g}_img_1.png")
    row = lambda g, a, b, tag, prefix="": {  # noqa: E731
        "id": g, "image_0": f"{prefix}ex_{g}_img_0", "image_1": f"{prefix}ex_{g}_img_1.png",
        "caption_0": f"{a} thing", "caption_1": f"{b} thing", "collapsed_tag": tag}  # fmt: skip
    rows = [row(0, "red", "blue", "Object", "images/"), row(1, "green", "yellow", "Object"),
            row(2, "blue", "red", "Relation", "images/")]  # fmt: skip
    (tmp_path / "examples.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for root in ("", str(tmp_path / "images")):
        data = load_winoground(tmp_path, root)
        assert len(data.groups) == 3 and not data.skipped, (root, data.skipped)
    cfg = EvalTaskConfig(task="compositional", dataset="winoground", path=str(tmp_path))
    protocols: dict = {}
    res = run_tasks(ToyMethod(), [cfg], progress=False, protocols=protocols)
    assert res["compositional/winoground/group_score"] == 1.0
    card = protocols["compositional/winoground"]
    assert card["n_groups"] == 3 and card["n_groups_per_tag"] == {"object": 2, "relation": 1}
    table = markdown_table(res, protocols)
    for metric, n in (("text_score", 3), ("group_score_object", 2), ("image_score_relation", 1)):
        assert f"| compositional/winoground | {metric} (%) | 6 / {n} |" in table, table


class _DotConditioned(ToyMethod):
    """The toy's global score routed through score_features (must equal the global path)."""

    def score_features(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        return image_feats @ text_feats.t()


def test_conditioned_scoring_matches_global_across_chunks():
    data = synthetic_pairs(7, 32)
    g, ga = evaluate_compositional(_ctx(), EvalTaskConfig(task="compositional", batch_size=3), data)
    cfg = EvalTaskConfig(
        task="compositional", batch_size=3, scoring="conditioned", memory_budget_mb=1
    )
    c, ca = evaluate_compositional(_ctx(_DotConditioned()), cfg, data)
    torch.testing.assert_close(ca["pair_scores"], ga["pair_scores"], atol=1e-6, rtol=0)
    for k in ("acc_replace_att", "acc_replace_obj", "acc_replace_rel"):  # no bag-of-words ties
        assert c[k] == g[k]


# ---- built-in version vs the generator's ground truth -------------------------------------
def _centre(o: dict) -> tuple[float, float]:
    return (o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2


def caption_true(caption: str, objects: list[dict]) -> bool:
    """Checks a built-in caption against the scene's objects and boxes (independent of how the
    generator wrote it): 'a C S and a C S' or 'a C S <relation> a C S'."""
    found = [(n, w) for n, w in RELATIONS.items() if f" {w} " in caption]
    name, sep = found[0] if found else ("", "and")
    left, right = caption.split(f" {sep} ")
    spec = lambda p: tuple(p.split()[1:3])  # noqa: E731  ('red', 'circle')
    for a in objects:
        for b in objects:
            if (
                a is b
                or (a["color"], a["shape"]) != spec(left)
                or (b["color"], b["shape"]) != spec(right)
            ):
                continue
            (ax, ay), (bx, by) = _centre(a), _centre(b)
            horizontal = abs(ax - bx) >= abs(ay - by)
            ok = {
                "": True,
                "left": horizontal and ax < bx,
                "right": horizontal and ax > bx,
                "up": not horizontal and ay < by,
                "down": not horizontal and ay > by,
            }[name]
            if ok:
                return True
    return False


class _Oracle(Method):
    """score(image, caption) = 1 when the caption is true of the scene shown, else 0."""

    Config = ToyConfig

    def __init__(self, scenes: dict[bytes, list[dict]], random: bool = False) -> None:
        super().__init__(ToyConfig())
        self.scenes, self.random, self.texts = scenes, random, []

    @staticmethod
    def key(x: torch.Tensor) -> bytes:
        return hashlib.sha1(x.contiguous().numpy().tobytes()).digest()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        self.texts += texts
        return torch.arange(len(self.texts) - len(texts), len(self.texts))

    def image_features_for_scoring(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([zlib.crc32(self.key(x)) for x in images])

    def text_features_for_scoring(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def score_features(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(image_feats), len(text_feats))
        for i, k in enumerate(image_feats.tolist()):
            for j, t in enumerate(text_feats.tolist()):
                if self.random:
                    out[i, j] = zlib.crc32(f"{k}|{self.texts[t]}".encode()) / 2**32
                else:
                    out[i, j] = float(caption_true(self.texts[t], self.scenes[k]))
        return out


def _keyed(scenes: list[dict], size: int) -> dict[int, list[dict]]:
    ctx = _ctx()
    tf = eval_transform(size, ctx.mean, ctx.std, crop=True)
    return {zlib.crc32(_Oracle.key(tf(s["image"]))): s["objects"] for s in scenes}


def test_builtin_pairs_captions_true_negatives_false():
    scenes = pair_scenes(200, 32)  # holds scenes whose two objects look alike (regression)
    data = synthetic_pairs(200, 32)
    for it, scene in zip(data.items, scenes):
        assert caption_true(it.positive, scene["objects"]), it.positive
        for neg, kind in zip(it.negatives, it.kinds):
            assert not caption_true(neg, scene["objects"]), (kind, neg, scene["objects"])


def test_builtin_pairs_oracle_100_random_near_chance():
    n, size = 64, 32
    data = synthetic_pairs(n, size)
    scenes = _keyed(pair_scenes(n, size), size)
    cfg = EvalTaskConfig(task="compositional", scoring="conditioned", batch_size=16)
    m, art = evaluate_compositional(_ctx(_Oracle(scenes)), cfg, data)
    kinds = ("swap_att", "swap_obj", "replace_att", "replace_obj", "replace_rel")
    assert all(m[f"acc_{k}"] == 1.0 for k in kinds) and m["acc"] == 1.0, m
    counts = art["protocol"]["n_pairs_per_kind"]
    assert counts["replace_rel"] == counts["replace_obj"] == n and counts["swap_att"] > n // 2
    m, _ = evaluate_compositional(_ctx(_Oracle(scenes, random=True)), cfg, data)
    assert abs(m["acc"] - 0.5) < 4 * (0.25 / (5 * n)) ** 0.5 + 0.02, m


def test_builtin_winoground_oracle_100_random_near_chance():
    n, size = 48, 32
    data = synthetic_winoground(n, size)
    groups = winoground_scenes(n, size)
    scenes = _keyed([s for _, x, y, _ in groups for s in (x, y)], size)
    for _, x, y, caps in groups:  # each caption true of its own scene only
        assert caption_true(caps[0], x["objects"]) and not caption_true(caps[0], y["objects"])
        assert caption_true(caps[1], y["objects"]) and not caption_true(caps[1], x["objects"])
    cfg = EvalTaskConfig(task="compositional", variant="winoground", scoring="conditioned")
    m, art = evaluate_compositional(_ctx(_Oracle(scenes)), cfg, data)
    assert all(v == 1.0 for k, v in m.items() if "score" in k) and len(m) == 9, m
    m, _ = evaluate_compositional(_ctx(_Oracle(scenes, random=True)), cfg, data)
    sd = lambda p: (p * (1 - p) / n) ** 0.5  # noqa: E731
    assert abs(m["text_score"] - 0.25) < 4 * sd(0.25) and abs(m["group_score"] - 1 / 6) < 4 * sd(
        1 / 6
    )
