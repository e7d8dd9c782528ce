"""DreamLIP's caption CSV (Zheng et al. 2024; the CC3M/CC12M/YFCC15M recaption files FLAIR
trains on, e.g. ``cc3m_3long_3short_1raw_captions_url.csv``) -> rows of our schema.

Columns: an image column plus ``raw_caption`` (the alt-text) and the MLLM captions
``shortIB_captions``, ``longIB_captions`` (InstructBLIP), ``shortSV_captions``,
``longSV_captions`` (ShareGPT4V), ``shortLLA_captions``, ``longLLA_captions`` (LLaVA). Each
caption cell is split into sentences as FLAIR's released ``preprocess/presplit_captions.py``
does (on newlines, ``</s>`` and periods; empty pieces dropped) and stored as a list under its
own name; ``caption`` is the raw alt-text, so the row is also a plain one-caption sample.
Train FLAIR on the result with ``method.caption_fields`` = ``DREAMLIP_FIELDS`` (``flair_vitb16``).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

DREAMLIP_COLUMNS = (
    "raw_caption",
    "shortIB_captions",
    "longIB_captions",
    "shortSV_captions",
    "longSV_captions",
    "shortLLA_captions",
    "longLLA_captions",
)


def split_caption(text: str) -> list[str]:
    """Sentences of one DreamLIP caption cell, by the released presplit rule."""
    return [t.strip() for t in re.split(r"\n|</s>|[.]", text) if t.strip()]


def read_dreamlip_csv(path: str | Path, image_column: str = "image") -> list[dict[str, Any]]:
    """Rows ``{"image", "caption", <each DreamLIP column>: [sentence, ...]}``. A missing
    column is a one-line error naming the file and the column."""
    p = Path(path).expanduser()
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        for col in (image_column, *DREAMLIP_COLUMNS):
            if col not in header:
                raise ValueError(
                    f"DreamLIP CSV {p}: missing column '{col}' (present: {', '.join(header)})"
                )
        rows = []
        for row in reader:
            out: dict[str, Any] = {"image": row[image_column], "caption": row["raw_caption"] or ""}
            for col in DREAMLIP_COLUMNS:
                out[col] = split_caption(row[col] or "")
            rows.append(out)
    return rows
