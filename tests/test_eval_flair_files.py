"""FLAIR's own retrieval evaluation files (issue 15), on tiny fixtures written in the released
layouts (ExplainableML/flair ``datasets/`` and ``src/flair/data.py``): fixed sentence lists of
DOCCI-FG / IIW-FG, Urban-1K's annotations.json, DCI over every split, IIW long, ShareGPT4V
1k/10k; long texts re-joined as the released code joins them; bad files -> one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finegrain.eval.config import EvalTaskConfig
from finegrain.eval.datasets import load_task_data
from finegrain.eval.flair_files import paper_retrieval_tasks, rejoin

from helpers.eval_toy import color_image


def _img(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color_image("red", seed=seed).save(path)


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


def _load(dataset: str, path: Path, variant: str = "flair", **kw):
    cfg = EvalTaskConfig(task="retrieval", dataset=dataset, path=str(path), variant=variant, **kw)
    return load_task_data(cfg)


def test_rejoin_is_the_released_rule() -> None:
    # split on newline, </s> and every '.', strip, drop empty pieces, join with '. '
    assert rejoin("A dog.  It runs\nfast 2.5 m</s> end.") == "A dog. It runs. fast 2. 5 m. end"
    assert rejoin("no stop") == "no stop"


def test_docci_fine_grained_fixed_sentences(tmp_path: Path) -> None:
    rows = [
        {"image_id": 5, "image": "test_00002.jpg", "caption": "A red cup"},
        {"image_id": 5, "image": "test_00002.jpg", "caption": "The cup is on a table."},
        {"image_id": 3, "image": "test_00001.jpg", "caption": "A blue car"},
        {"image_id": 5, "image": "test_00002.jpg", "caption": "Light from the left"},
    ]
    _write(tmp_path / "annotations" / "test_annotations.json", {"annotations": rows})
    for i, n in enumerate(("test_00001.jpg", "test_00002.jpg")):
        _img(tmp_path / "images" / n, i)
    d = _load("docci", tmp_path)
    assert [p.name for p in d.images] == ["test_00002.jpg", "test_00001.jpg"]  # first appearance
    assert d.texts == [r["caption"] for r in rows]  # as they are, not re-split or re-joined
    assert d.text_to_image == [0, 0, 1, 0] and d.image_ids == ["5", "3"]
    # the file itself as path; the re-splitting path (original DOCCI file) is another variant
    assert _load("docci", tmp_path / "annotations" / "test_annotations.json").texts == d.texts
    (tmp_path / "images" / "test_00001.jpg").unlink()
    with pytest.raises(ValueError, match=r"test_00001\.jpg referenced by .*test_annotations"):
        _load("docci", tmp_path)


def test_iiw_fine_grained_and_long(tmp_path: Path) -> None:
    rows = [
        {"image_id": 0, "image": "docci/test_00731.jpg", "caption": "A toilet", "caption_id": 0},
        {"image_id": 1, "image": "dci/sa_1.jpg", "caption": "A tree", "caption_id": 1},
        {"image_id": 0, "image": "docci/test_00731.jpg", "caption": "Chrome rack", "caption_id": 2},
    ]
    _write(tmp_path / "test_annotations.json", {"annotations": rows})
    _img(tmp_path / "docci" / "test_00731.jpg")
    _img(tmp_path / "dci" / "sa_1.jpg", 1)
    fg = _load("iiw", tmp_path)
    assert fg.texts == ["A toilet", "A tree", "Chrome rack"] and fg.text_to_image == [0, 1, 0]
    # long: DOCCI_Test, IIW-400, DCI_Test in that order; '.jpg' added where missing
    subsets = {
        "DOCCI_Test": ("docci", {"image": "test_00731", "IIW": "A white toilet.\nIt is clean."}),
        "IIW-400": ("docci_aar", {"image/key": "aar_1", "IIW": "Mountains. Snow"}),
        "DCI_Test": ("dci", {"image": "sa_1.jpg", "IIW": "A tree. Green."}),
    }
    for subset, (folder, row) in subsets.items():
        _write(tmp_path / subset / "data.jsonl", json.dumps(row) + "\n")
        name = row.get("image", row.get("image/key"))
        _img(tmp_path / folder / (name if name.endswith(".jpg") else name + ".jpg"))
    long = _load("iiw", tmp_path, variant="flair_long")
    assert [p.parent.name + "/" + p.name for p in long.images] == [
        "docci/test_00731.jpg", "docci_aar/aar_1.jpg", "dci/sa_1.jpg",
    ]  # fmt: skip
    assert long.texts == ["A white toilet. It is clean", "Mountains. Snow", "A tree. Green"]
    assert long.text_to_image == [0, 1, 2]


def test_dci_every_split_and_released_join(tmp_path: Path) -> None:
    base = tmp_path / "densely_captioned_images"
    _write(base / "splits.json", {"train": ["1-data.json"], "test": ["2-data.json"]})
    for i, (short, extra) in enumerate([("A cat", "It sleeps. On a mat."), ("A bus.", "Red")]):
        ann = {"image": f"sa_{i}.jpg", "short_caption": short, "extra_caption": extra}
        _write(base / "annotations" / f"{i + 1}-data.json", ann)
        _img(base / "photos" / f"sa_{i}.jpg", i)
    d = _load("dci", tmp_path)
    assert d.texts == ["A cat. It sleeps. On a mat", "A bus. Red"]  # train AND test, as released
    assert d.text_to_image == [0, 1] and d.image_ids == ["1-data.json", "2-data.json"]
    _write(base / "annotations" / "2-data.json", {"image": "sa_1.jpg", "short_caption": "x"})
    with pytest.raises(ValueError, match=r"2-data\.json: entry 0 has no field 'extra_caption'"):
        _load("dci", tmp_path)


def test_urban1k_annotations_json(tmp_path: Path) -> None:
    rows = [
        {"image_id": 0, "image": "1.jpg", "caption": "A cafe. Umbrellas.\nSunny."},
        {"image_id": 1, "image": "10.jpg", "caption": "A green bus"},
    ]
    _write(tmp_path / "annotations" / "annotations.json", {"annotations": rows})
    for i, n in enumerate(("1.jpg", "10.jpg")):
        _img(tmp_path / "images" / n, i)
    d = _load("urban1k", tmp_path)
    assert d.texts == [r["caption"] for r in rows]  # Urban-1K captions are not re-joined
    assert [p.name for p in d.images] == ["1.jpg", "10.jpg"] and d.text_to_image == [0, 1]
    _write(tmp_path / "annotations" / "annotations.json", {"annotations": [{"image": "1.jpg"}]})
    with pytest.raises(ValueError, match=r"annotations\.json: entry 0 has no field 'image_id'"):
        _load("urban1k", tmp_path)


def test_sharegpt4v_first_k_and_image_rule(tmp_path: Path) -> None:
    entries = [
        {
            "id": f"sa_{i}",
            "image": f"sam/images/sa_{i}.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe."},
                {"from": "gpt", "value": f"Picture {i}. Two people.\nA dog."},
            ],
        }
        for i in range(4)
    ]
    _write(tmp_path / "share4v_sam_10k.json", entries)
    for i in range(4):
        _img(tmp_path / "sam" / f"sa_{i}.jpg", i)  # '/images' removed, as the released code
    d = _load("sharegpt4v", tmp_path, limit=3)
    assert d.texts == [f"Picture {i}. Two people. A dog" for i in range(3)]
    assert [p.as_posix().split("/")[-2:] for p in d.images] == [
        ["sam", f"sa_{i}.jpg"] for i in range(3)
    ]
    assert len(_load("sharegpt4v", tmp_path).images) == 4  # limit 0: the whole file
    with pytest.raises(
        ValueError, match=r"share4v_sam_10k\.json has 4 entries, fewer than limit=1000"
    ):
        _load("sharegpt4v", tmp_path, limit=1000)


def test_unknown_flair_dataset_and_paper_tasks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no FLAIR evaluation file.*valid datasets: docci"):
        _load("coco", tmp_path)
    with pytest.raises(ValueError, match="FLAIR annotation file not found"):
        _load("docci", tmp_path)
    tasks = paper_retrieval_tasks(str(tmp_path))
    assert [t.name for t in tasks] == [
        "flair/docci_fg", "flair/iiw_fg", "flair/dci", "flair/iiw", "flair/sharegpt4v_1k",
        "flair/sharegpt4v_10k", "flair/urban1k",
    ]  # fmt: skip
    assert {t.scoring for t in tasks} == {"conditioned"} and tasks[4].limit == 1000
