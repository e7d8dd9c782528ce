"""Issue 26 item 4 (+3): the spurious-correlation scenes (training correlation, balanced test
groups), worst-group accuracy against a naive reference, per-box values of the region-level
tasks, seed-resampling intervals, n/a with a reason, and the new claim rows (the quick run's
rows are checked in tests/test_demo.py, which runs every claim of ``CLAIMS``)."""

from __future__ import annotations

import random

import pytest
import torch

from finegrain.bench.claims import CLAIMS, Claim, check_claim, statistic
from finegrain.bench.spurious import (
    add_group_metrics,
    group_accuracies,
    worst_group_accuracy,
    worst_group_chance,
)
from finegrain.bench.tasks import TaskResult, per_image_values, task_specs
from finegrain.data.config import SyntheticConfig
from finegrain.data.synthetic import generate_scene, train_scene_seed
from finegrain.data.synthetic_sets import SyntheticScenes, eval_split
from finegrain.data.synthetic_spurious import (
    SPURIOUS_CLASSES,
    TONES,
    is_spurious,
    spurious_choice,
    training_scene,
)


# ---- the spurious-correlation scenes ----------------------------------------------------------
def test_training_share_and_correlation():
    """About ``spurious_share`` of the training scenes are spurious scenes, and in them the
    background tone is the class's own in about ``spurious_correlation`` of them (binomial
    tolerances: 4 standard deviations), with both classes about equally often."""
    cfg = SyntheticConfig(num_samples=20_000, seed=3, spurious_share=0.25)
    idx = [i for i in range(cfg.num_samples) if is_spurious(cfg, i)]
    n, p = cfg.num_samples, cfg.spurious_share
    assert abs(len(idx) - n * p) < 4 * (n * p * (1 - p)) ** 0.5
    choices = [spurious_choice(cfg, i) for i in idx]
    own = sum(label == tone for label, tone in choices)
    q = cfg.spurious_correlation
    assert abs(own - len(idx) * q) < 4 * (len(idx) * q * (1 - q)) ** 0.5
    first = sum(label == 0 for label, _ in choices)
    assert abs(first - len(idx) / 2) < 4 * (len(idx) / 4) ** 0.5
    # the minority scenes exist: each class is seen on the other tone too
    assert {(label, tone) for label, tone in choices} == {(a, b) for a in (0, 1) for b in (0, 1)}


def test_spurious_training_scenes_render_what_they_say():
    cfg = SyntheticConfig(num_samples=64, seed=1, spurious_share=0.5)
    ds = SyntheticScenes(cfg, image_size=64)
    seen = 0
    for i in range(cfg.num_samples):
        scene = ds.scene(i)
        if not is_spurious(cfg, i):
            assert "spurious" not in scene
            continue
        seen += 1
        label, tone = spurious_choice(cfg, i)
        assert [o["shape"] for o in scene["objects"]] == [SPURIOUS_CLASSES[label]]
        assert scene["background"]["tone"] == TONES[tone]
        assert TONES[tone] in scene["long_caption"]  # the text names the tone, never the rule
    assert seen > 16


def test_no_share_leaves_the_training_scenes_unchanged():
    """``spurious_share=0`` (the default) gives exactly the ordinary scenes, and forcing a tone
    changes the background only (the random stream after it is the same)."""
    cfg = SyntheticConfig(num_samples=8, seed=2)
    for i in range(cfg.num_samples):
        a = training_scene(cfg, i, 64)
        b = generate_scene(train_scene_seed(cfg.seed, i), 64, cfg=cfg)
        assert a["caption"] == b["caption"] and a["objects"] == b["objects"]
        assert a["image"].tobytes() == b["image"].tobytes()
    plain = generate_scene(7, 64)
    toned = generate_scene(7, 64, background_tone=TONES[1])
    assert plain["objects"] == toned["objects"] and toned["background"]["tone"] == TONES[1]
    assert plain["image"].tobytes() != toned["image"].tobytes()


def test_bad_share_is_one_line():
    with pytest.raises(ValueError, match="spurious_share must be in"):
        is_spurious(SyntheticConfig(spurious_share=1.5), 0)


def test_test_split_is_balanced_and_labelled():
    d = eval_split("spurious", 24, image_size=64)
    assert d["classnames"] == list(SPURIOUS_CLASSES)
    assert torch.bincount(torch.tensor(d["groups"])).tolist() == [6, 6, 6, 6]
    for label, tone, g in zip(d["labels"], d["tones"], d["groups"]):
        assert g == label * len(TONES) + tone
    # both tones with both classes: the class is independent of the tone at test
    pairs = {(y, t) for y, t in zip(d["labels"], d["tones"])}
    assert len(pairs) == 4


# ---- worst-group accuracy ---------------------------------------------------------------------
def _naive_worst(correct: list[float], groups: list[int], idx: list[int]) -> float:
    hits: dict[int, list[float]] = {}
    for i in idx:
        hits.setdefault(groups[i], []).append(correct[i])
    return min(sum(v) / len(v) for v in hits.values())


def test_worst_group_matches_a_naive_reference_on_resamples():
    rng = random.Random(0)
    correct = [float(rng.random() < 0.7) for _ in range(40)]
    groups = [rng.randrange(4) for _ in range(40)]
    c, g = torch.tensor(correct, dtype=torch.float64), torch.tensor(groups)
    for _ in range(20):
        idx = [rng.randrange(40) for _ in range(40)]
        want = _naive_worst(correct, groups, idx)
        assert worst_group_accuracy(c, g, torch.tensor(idx)) == pytest.approx(want, abs=1e-12)
    assert worst_group_accuracy(c, g) == pytest.approx(_naive_worst(correct, groups, range(40)))
    acc = group_accuracies(c, g, torch.tensor([0, 0]))  # one group drawn: the others are NaN
    assert acc.isnan().sum() == 3


def test_worst_group_chance():
    """One group: the mean of a binomial proportion, 1 / C; two one-image groups of a coin:
    both right only with probability 1/4."""
    assert worst_group_chance([50], 2) == pytest.approx(0.5, abs=0.01)
    assert worst_group_chance([1, 1], 2) == pytest.approx(0.25, abs=0.02)
    assert worst_group_chance([8] * 4, 2) < 0.5


def _spurious_result(correct: list[int], groups: list[int]) -> TaskResult:
    v = torch.tensor(correct, dtype=torch.float64)
    res = TaskResult({"acc1": v.mean().item()}, {"acc1": (v, torch.arange(len(v)))},
                     protocol={"n_classes": 2})  # fmt: skip
    add_group_metrics(res, groups, ["a on x", "a on y", "b on x", "b on y"])
    return res


def test_worst_group_claim_held_when_the_baseline_reads_the_background():
    """CLIP right on the two groups where tone and class agree, wrong on the others; CLIPpy
    right everywhere: same average gap, and the worst group shows the whole of it."""
    groups = [i % 4 for i in range(200)]
    base = [1 if g in (0, 3) else 0 for g in groups]
    res_base, res_mine = _spurious_result(base, groups), _spurious_result([1] * 200, groups)
    assert res_base.metrics["worst_group_acc"] == 0.0 and res_base.metrics["acc1"] == 0.5
    assert res_base.metrics["acc_a_on_y"] == 0.0 and res_base.protocol["groups"]["b on y"] == 50
    claim = next(c for c in CLAIMS if c.metric == "worst_group_acc")
    assert claim.method == "clippy" and "Ranasinghe" in claim.paper and claim.source
    runs = {"clippy": [{"spurious": res_mine}], "clip": [{"spurious": res_base}]}
    c = check_claim(claim, runs, draws=200)
    assert c["verdict"] == "held" and c["diff"] == 1.0 and c["ci_low"] == 1.0
    assert statistic(res_base.per_image, "worst_group_acc", torch.tensor([0, 3])) == 1.0


# ---- region-level tasks ------------------------------------------------------------------------
def test_per_box_values_of_the_region_level_tasks():
    """Region classification, attribute hard negatives (ties are errors) and caption pairs:
    one value per box or pair with its image, whose mean is the task's metric."""
    from finegrain.eval.compositional import CompositionalItem
    from finegrain.eval.hardneg import HardNegItem

    art = {"top": torch.tensor([[2, 1], [0, 1], [1, 0]]), "labels": torch.tensor([2, 1, 1]),
           "image_index": torch.tensor([0, 0, 3])}  # fmt: skip
    per = per_image_values("region", None, art, {"acc1": 2 / 3})
    assert per["acc1"][0].tolist() == [1.0, 0.0, 1.0] and per["acc1"][1].tolist() == [0, 0, 3]
    assert statistic(per, "acc1", None) == pytest.approx(2 / 3)
    items = [HardNegItem(0, None, "p", ["n1", "n2"]), HardNegItem(1, None, "p", ["n1"]),
             HardNegItem(1, None, "p", ["n1"])]  # fmt: skip
    scores = [torch.tensor([0.9, 0.1, 0.2]), torch.tensor([0.5, 0.5]), torch.tensor([0.1, 0.4])]
    per = per_image_values("hardneg", None, {"scores": scores, "items": items}, {})
    assert per["acc1"][0].tolist() == [1.0, 0.0, 0.0] and per["acc1"][1].tolist() == [0, 1, 1]
    comp = [CompositionalItem(0, "c", ["n1", "n2"], ["swap_att", "replace_obj"]),
            CompositionalItem(2, "c", ["n1"], ["swap_att"])]  # fmt: skip
    flat = torch.tensor([0.5, 0.4, 0.6, 0.3, 0.3])
    per = per_image_values("compositional", None, {"items": comp, "pair_scores": flat}, {})
    assert per["acc_swap_att"][0].tolist() == [1.0, 0.0]
    assert per["acc_swap_att"][1].tolist() == [0, 2]
    assert per["acc_replace_obj"][0].tolist() == [0.0]


def test_region_tasks_for_every_method_and_their_claims():
    specs = {s.key: s for s in task_specs()}
    assert specs["regions/crop"].needs == ""  # every method encodes a crop
    assert specs["regions/roialign"].needs == "dense"
    assert specs["regions/queries"].needs == "regions"
    assert specs["hardneg/regions+conditioned"].needs == "conditioned"
    assert specs["spurious"].headline == ("acc1", "worst_group_acc")
    for c in CLAIMS:
        assert c.task in specs and (not c.method_task or c.method_task in specs), c
        assert c.source, f"{c.what}: say where the paper makes the claim"
    grain = next(c for c in CLAIMS if c.method_task == "regions/queries")
    assert grain.task == "regions/crop"  # GRAIN's own region reading vs CLIP on crops


def test_a_method_that_cannot_do_a_task_is_na_with_the_reason():
    from finegrain.bench.tasks import cannot

    claim = Claim("detailclip", "regions/roialign", "acc1", "X > CLIP (test)", "test")
    ok = TaskResult({"acc1": 0.5}, {"acc1": (torch.ones(4), torch.arange(4))})
    runs = {"detailclip": [{"regions/roialign": TaskResult(na=cannot("dense"))}],
            "clip": [{"regions/roialign": ok}]}  # fmt: skip
    assert check_claim(claim, runs)["verdict"] == "n/a (no dense features)"


# ---- power: seeds pooled with images -------------------------------------------------------------
def _acc(values: list[int]) -> TaskResult:
    v = torch.tensor(values, dtype=torch.float64)
    return TaskResult({"acc1": v.mean().item()}, {"acc1": (v, torch.arange(len(v)))})


def test_interval_pools_seeds_and_images():
    """Two seeds whose difference is 0 on every resample of one and 1 on every resample of the
    other: resampling images alone gives the point interval [0.5, 0.5]; resampling the seeds
    too gives [0, 1] (the training seed's variation is part of the interval)."""
    claim = Claim("grain", "shape/names", "acc1", "GRAIN > CLIP (test)", "test")
    runs = {"grain": [{"shape/names": _acc([1] * 50)}, {"shape/names": _acc([1] * 50)}],
            "clip": [{"shape/names": _acc([1] * 50)}, {"shape/names": _acc([0] * 50)}]}  # fmt: skip
    c = check_claim(claim, runs, draws=400)
    assert c["diff"] == 0.5 and (c["ci_low"], c["ci_high"]) == (0.0, 1.0)
    assert c["half_width"] == 0.5 and c["verdict"] == "inconclusive"
    one = {m: r[:1] for m, r in runs.items()}  # one seed: images only, as before
    assert check_claim(claim, one, draws=400)["half_width"] == 0.0


def test_region_level_tasks_are_sized_by_region_images():
    """The region-level tasks (several crops per image) take ``region_images`` at most; the
    spurious split and the other tasks take ``eval_images`` (the worst group needs them)."""
    from finegrain.bench.config import FULL, QUICK, Budget
    from finegrain.bench.tasks import images_for

    specs = {s.key: s for s in task_specs()}
    for key in ("regions/crop", "regions/queries", "hardneg/regions+conditioned",
                "compositional/pairs"):  # fmt: skip
        assert images_for(specs[key], Budget()) == Budget().region_images < Budget().eval_images
        assert images_for(specs[key], FULL) == FULL.region_images
        assert images_for(specs[key], QUICK) == QUICK.eval_images  # never above eval_images
    for key in ("spurious", "shape/names", "segmentation/zeroshot"):
        assert images_for(specs[key], FULL) == FULL.eval_images
