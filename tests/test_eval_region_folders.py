"""Region classification on a COCO folder as released (issue 25): ``annotations/
instances_{train,val}2017.json`` (+ captions, keypoints) beside ``train2017/`` and ``val2017/``,
written in the test; no option needed (val2017), ``split=`` picks another file."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_eval_regions import EXPECTED, NAMES, SignedColour, _image, write_instances

from finegrain.eval import run_tasks
from finegrain.eval.region_data import load_region_data
from finegrain.eval_cli import parse_task


def test_standard_coco_folder_needs_no_option(tmp_path):
    """``region:coco=<coco>`` on the released layout: annotations/instances_{train,val}2017.json
    (+ captions, keypoints) and train2017/, val2017/ image folders; val2017 when no split is
    given, ``split=train`` picks the other file, an unmatched split is one line naming them."""
    write_instances(tmp_path)  # annotations/instances_val2017.json + val2017/
    ann = tmp_path / "annotations"
    (tmp_path / "train2017").mkdir()
    _image((16, 16), [("blue", (2, 2, 12, 12))]).save(tmp_path / "train2017" / "000000000009.png")
    train = {"images": [{"id": 9, "file_name": "000000000009.png", "width": 16, "height": 16}],
             "annotations": [{"id": 0, "image_id": 9, "bbox": [2, 2, 12, 12], "iscrowd": 0,
                              "category_id": 12}],
             "categories": [{"id": 10 + i, "name": n} for i, n in enumerate(NAMES)]}  # fmt: skip
    (ann / "instances_train2017.json").write_text(json.dumps(train))
    for other in ("captions_val2017.json", "person_keypoints_val2017.json"):
        (ann / other).write_text(json.dumps({"images": [], "annotations": []}))
    cfg = parse_task(f"region:coco={tmp_path}@templates=plain")
    assert cfg.split == "val"
    data = load_region_data(cfg)
    assert data.source == "instances_val2017.json" and len(data.images) == 3
    results = run_tasks(SignedColour(), [cfg], progress=False)
    assert results["region/coco/crop/acc1"] == pytest.approx(EXPECTED["acc1"])
    data = load_region_data(parse_task(f"region:coco={tmp_path}@split=train"))
    assert data.source == "instances_train2017.json" and data.labels == [[2]]
    with pytest.raises(ValueError, match=r"split='test' matches none .* one of train2017, val2017"):
        load_region_data(parse_task(f"region:coco={tmp_path}@split=test"))
    # a 2014 release beside it: 'val' is ambiguous (minival2014 is not 'val' + a year)
    for name in ("instances_val2014.json", "instances_minival2014.json"):
        (ann / name).write_text(json.dumps(train))
    with pytest.raises(ValueError, match=r"matches 2 of instances_val2014.json, instances_val201"):
        load_region_data(cfg)
    assert load_region_data(replace(cfg, split="val2017")).source == "instances_val2017.json"
    # images under images/val2017 (another common layout) are found as well
    (tmp_path / "images").mkdir()
    (tmp_path / "val2017").rename(tmp_path / "images" / "val2017")
    assert len(load_region_data(replace(cfg, split="val2017")).images) == 3
