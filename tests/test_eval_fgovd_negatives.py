"""FG-OVD's per-file negatives protocol (issue 25): its evaluation code scores each box against
its first N negatives and drops boxes with fewer, N = 10 except pattern (7) and transparency
(2); benchmark files written in the test in FG-OVD's released layout."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_eval_hardneg import _fgovd_fixture

from finegrain.eval.common import EvalContext
from finegrain.eval.hardneg import evaluate_hardneg
from finegrain.eval.hardneg_data import load_hardneg_data
from finegrain.eval_cli import parse_task

from helpers.eval_toy import ToyMethod


def _fgovd_file(bench, stem, boxes) -> None:
    """An FG-OVD benchmark file: ``boxes`` = (bbox, positive, negatives) on image val2017/1.jpg."""
    names = list(dict.fromkeys(t for _, pos, negs in boxes for t in [pos, *negs]))
    anns = [{"id": i, "image_id": 1, "bbox": box, "category_id": names.index(pos),
             "neg_category_ids": [names.index(t) for t in negs]}
            for i, (box, pos, negs) in enumerate(boxes)]  # fmt: skip
    raw = {"images": [{"id": 1, "file_name": "val2017/1.jpg", "width": 64, "height": 48}],
           "annotations": anns,
           "categories": [{"id": i, "name": n, "synset": ""} for i, n in enumerate(names)]}  # fmt: skip
    (bench / f"{stem}.json").write_text(json.dumps(raw))


def test_fgovd_default_negatives_follow_its_per_file_protocol(tmp_path):
    """FG-OVD's ranks.py scores the first N negatives and drops boxes with fewer: N = 10, pattern
    7, transparency 2 (run_all_ranks.py). That is the default (num_negatives=-1); an explicit
    count or 0 (all) overrides it, and a file FG-OVD does not name keeps all."""
    bench, root = _fgovd_fixture(tmp_path)
    red, blue = [4, 10, 20, 20], [36, 10, 20, 20]
    others = [f"A {c}{p} square." for p in ("", " striped") for c in ("green", "yellow", "purple")]
    seven = others[:5] + ["A blue square.", "A white square."]  # never red: the positive wins
    tie = "A red, square."  # the toy reads it as the positive: a tie (an error) once scored
    _fgovd_file(bench, "pattern", [(red, "A red square.", [*seven, tie]),  # first 7 only
                                   (red, "A red square.", seven[:6]),  # 6 < 7: skipped
                                   (blue, "A blue square.", [*others, "A red square."])])  # fmt: skip
    _fgovd_file(bench, "transparency", [(red, "A red square.", ["A blue square.", "A green square.", tie]),
                                        (red, "A red square.", ["A blue square."])])  # fmt: skip
    ten = [*seven, "A red striped square.", "A blue striped square.", "A white striped square."]
    _fgovd_file(bench, "1_attributes", [(red, "A red square.", ten), (red, "A red square.", seven)])
    _fgovd_file(bench, "mine", [(red, "A red square.", ["A blue square.", tie])])
    mine = json.loads((bench / "mine.json").read_text())
    mine["annotations"][0]["neg_category_ids"].append(99)  # no such category: counted
    (bench / "mine.json").write_text(json.dumps(mine))
    ctx = EvalContext.create(ToyMethod(), progress=False)
    want = {"pattern": (7, 2, 1), "transparency": (2, 1, 1), "1_attributes": (10, 1, 1),
            "mine": (0, 1, 0)}  # fmt: skip  # stem: (N, boxes scored, boxes with fewer)
    for stem, (n, boxes, fewer) in want.items():
        cfg = parse_task(f"hardneg:fgovd/{stem}={bench}@image_root={root}@crop_margin=0")
        assert cfg.num_negatives == -1
        m, art = evaluate_hardneg(ctx, cfg, load_hardneg_data(cfg, 32))
        p = art["protocol"]
        assert (p["num_negatives"], p["n_boxes"]) == (n, boxes), stem
        assert p["num_negatives_from"] == "the data's protocol"
        assert m.get("skipped_few_negatives", 0) == fewer, stem
        if n:
            assert p["n_negatives"] == n  # every scored box against exactly its first N
        assert m.get("skipped_unknown_negative_category", 0) == (stem == "mine")
    # pattern: the first box's 8th negative (a tie) is cut under FG-OVD's 7
    cfg = parse_task(f"hardneg:fgovd/pattern={bench}@image_root={root}@crop_margin=0")
    pattern = load_hardneg_data(cfg, 32)
    assert evaluate_hardneg(ctx, cfg, pattern)[0]["acc1"] == 1.0
    m, art = evaluate_hardneg(ctx, replace(cfg, num_negatives=0), pattern)  # all: the tie counts
    assert m["acc1"] == pytest.approx(2 / 3) and art["protocol"]["num_negatives_from"] == "option"
    # the README's former num_negatives=10 leaves transparency nothing: one line saying why
    trans = replace(cfg, variant="transparency", num_negatives=10)
    with pytest.raises(ValueError, match=r"no box left .*'few_negatives': 2.*num_negatives=10"):
        evaluate_hardneg(ctx, trans, load_hardneg_data(trans, 32))
