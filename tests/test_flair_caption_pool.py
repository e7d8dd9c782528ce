"""FLAIR's caption pool as released: configurable fields (DreamLIP's mix), the DreamLIP CSV
converter, and fail-fast errors for absent fields and missing CSV columns."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from finegrain.data.dreamlip import DREAMLIP_COLUMNS, read_dreamlip_csv, split_caption
from finegrain.data.shards import convert_manifest
from finegrain.data.sources import iter_tar
from finegrain.methods.flair import DREAMLIP_FIELDS, FLAIRCollate, caption_pool
from finegrain.recipes.base import get_recipe


def _row(i: int) -> dict[str, str]:
    row = {"image": f"{i}.png", "raw_caption": f"alt text {i}"}
    for col in DREAMLIP_COLUMNS[1:]:
        row[col] = f"{col} one {i}. {col} two {i}\n{col} three</s>"
    return row


def _write_csv(tmp_path, rows, columns=None):
    for r in rows:
        Image.new("RGB", (8, 8), (i := int(r["image"][0]) * 40, i, i)).save(tmp_path / r["image"])
    path = tmp_path / "dreamlip.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns or list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in (columns or list(r))})
    return path


def test_pool_is_the_concatenation_of_the_configured_fields() -> None:
    s = {
        "caption": "a dog. on grass",
        "sentences": ["x"],
        "meta": {"shortIB_captions": ["a brown dog"], "longIB_captions": "It runs. It jumps."},
    }
    fields = ["caption", "shortIB_captions", "longIB_captions", "absent"]
    assert caption_pool(s, fields=fields) == [
        "a dog.",
        "on grass",
        "a brown dog",
        "It runs.",
        "It jumps.",
    ]
    assert caption_pool(s) == ["x"]  # no fields: the caption_source rule as before


def test_absent_field_fails_fast_naming_field_and_keys() -> None:
    collate = FLAIRCollate(lambda t: None, 2, 1, "diverse", "auto", ["raw_caption", "longSV"])
    samples = [{"caption": "c", "meta": {"raw_caption": ["c"], "longSV_captions": ["d"]}}] * 2
    with pytest.raises(ValueError, match=r"field 'longSV' is absent .*present keys: .*longSV_c"):
        collate(samples)


def test_split_caption_as_released_presplit() -> None:
    assert split_caption("A cat. It sits\non a mat</s> .. end") == [
        "A cat",
        "It sits",
        "on a mat",
        "end",
    ]


def test_dreamlip_csv_to_shards_and_pool(tmp_path) -> None:
    path = _write_csv(tmp_path, [_row(i) for i in range(3)])
    out = convert_manifest(str(path), "", str(tmp_path / "shards"), layout="dreamlip")
    assert out["written"] == 3 and out["missing_image"] == 0
    records = [json.loads(s["json"]) for s in iter_tar(out["shards"][0])]
    assert len(records) == 3
    rec = records[1]
    assert rec["caption"] == "alt text 1" and rec["raw_caption"] == ["alt text 1"]
    assert rec["longLLA_captions"] == [
        "longLLA_captions one 1",
        "longLLA_captions two 1",
        "longLLA_captions three",
    ]
    # as a FLAIR sample (extra JSON fields ride in meta): the pool has all 1 + 6 * 3 sentences
    sample = {"caption": rec["caption"], "meta": {k: rec[k] for k in DREAMLIP_FIELDS}}
    pool = caption_pool(sample, fields=list(DREAMLIP_FIELDS))
    assert len(pool) == 19 and pool[0] == "alt text 1" and pool[1] == "shortIB_captions one 1"


def test_dreamlip_missing_column_names_file_and_column(tmp_path) -> None:
    rows = [_row(0)]
    path = _write_csv(tmp_path, rows, [c for c in rows[0] if c != "shortSV_captions"])
    with pytest.raises(ValueError, match=r"dreamlip.csv: missing column 'shortSV_captions'"):
        read_dreamlip_csv(path)
    with pytest.raises(ValueError, match=r"missing column 'url'"):
        read_dreamlip_csv(_write_csv(tmp_path, rows), image_column="url")


def test_flair_vitb16_uses_the_released_mix() -> None:
    assert get_recipe("flair_vitb16").method.caption_fields == list(DREAMLIP_FIELDS)
