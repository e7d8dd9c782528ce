"""FLAIR's own retrieval evaluation files, loaded as the released code reads them
(ExplainableML/flair ``src/flair/data.py``: ``read_docci_pairs``, ``read_iiw_pairs``,
``read_dci_pairs``, ``read_urban1k_pairs``, ``read_sharegpt4v_pairs``), so numbers are
comparable with the paper's tables. Selected by ``variant="flair"`` on a retrieval task (and
``variant="flair_long"`` for IIW's long-caption retrieval); the other variants re-split the
datasets' original files (``finegrain.eval.formats``).

Layouts (paths relative to the task's ``path``; a path may also name the JSON file itself):

- ``docci`` (DOCCI-FG, fine-grained): ``annotations/test_annotations.json`` =
  ``{"annotations": [{"image_id", "image", "caption"}]}``, one row per fixed sentence; images
  in ``images/<image>``;
- ``iiw`` (IIW-FG): ``test_annotations.json`` = ``{"annotations": [{"image_id", "image",
  "caption", "caption_id"}]}``; images at ``<path>/<image>`` (``docci/...``, ``dci/...``);
- ``iiw`` + ``flair_long``: ``{DOCCI_Test, IIW-400, DCI_Test}/data.jsonl`` (``image`` or
  ``image/key``, ``IIW``), images in ``{docci, docci_aar, dci}/<name>[.jpg]``;
- ``dci``: ``densely_captioned_images/splits.json``: *every* split's annotation files (the
  released code concatenates all of them), text ``short_caption + "\\n" + extra_caption``;
- ``urban1k``: ``annotations/annotations.json`` (``{"annotations": [{"image_id", "image",
  "caption"}]}``), images in ``images/``;
- ``sharegpt4v``: ``share4v_sam_10k.json``, the first ``limit`` entries (SV-1k: 1000,
  SV-10k: 10000; 0 = the whole file), text = ``conversations[1]["value"]``, image path with
  ``/images`` removed as the released code does (the path as written when that file is absent).

Long texts of DCI, IIW (long) and ShareGPT4V are re-joined as released:
``". ".join(split_caption(text))`` with ``split_caption`` splitting on newlines, ``</s>`` and
every ``.`` (decimal points included); DOCCI-FG, IIW-FG and Urban-1K texts are used as they
are. Images are the distinct ``image_id`` values in order of first appearance and each text
belongs to one image (the released ``map_img_cap``); R@k is then the released
``compute_retrieval`` (text -> its image; image -> the best-ranked of its texts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finegrain.data.dreamlip import split_caption
from finegrain.eval.config import RetrievalTaskConfig
from finegrain.eval.containers import RetrievalData

FLAIR_VARIANTS = ("flair", "flair_long")
IIW_LONG_SUBSETS = (("DOCCI_Test", "docci"), ("IIW-400", "docci_aar"), ("DCI_Test", "dci"))


def rejoin(text: str) -> str:
    """The released long-text normalisation: ``". ".join(split_caption(text))``."""
    return ". ".join(split_caption(text))


def _json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ValueError(f"{what} not found: {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def _field(row: Any, key: str, path: Path, i: int) -> Any:
    if not isinstance(row, dict) or key not in row:
        raise ValueError(f"{path}: entry {i} has no field '{key}'")
    return row[key]


def _annotation_rows(path: Path) -> list[dict]:
    data = _json(path, "FLAIR annotation file")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: expected {{'annotations': [...]}} (FLAIR's layout)")
    return data["annotations"]


def _resolve(candidates: list[Path], annotation: Path, i: int) -> Path:
    for c in candidates:
        if c.is_file():
            return c
    raise ValueError(f"image {candidates[0]} referenced by {annotation} (entry {i}) does not exist")


def _pairs_to_data(
    rows: list[tuple[Any, list[Path], str]], annotation: Path, ids: list[str] | None = None
) -> RetrievalData:
    """(image_id, image path candidates, text) per text -> RetrievalData with the distinct
    image ids in order of first appearance (images checked once each)."""
    index: dict[Any, int] = {}
    images: list[Path] = []
    texts, owner = [], []
    for i, (image_id, cands, text) in enumerate(rows):
        if image_id not in index:
            index[image_id] = len(images)
            images.append(_resolve(cands, annotation, i))
        texts.append(str(text))
        owner.append(index[image_id])
    return RetrievalData(images, texts, owner, ids or [str(k) for k in index])


def _file_and_root(path: Path, image_root: str, default: str, rel_root: str) -> tuple[Path, Path]:
    """(annotation file, image folder) for ``path`` = the dataset folder or the file itself."""
    if path.is_dir():
        ann, base = path / default, path
    else:
        ann = path
        base = ann.parents[default.count("/")]  # the dataset folder above the default subpath
    return ann, Path(image_root).expanduser() if image_root else base / rel_root


def load_fixed_list(dataset: str, path: Path, image_root: str) -> RetrievalData:
    """DOCCI-FG / IIW-FG / Urban-1K: FLAIR's ``{"annotations": [...]}`` files as they are."""
    default, rel = {
        "docci": ("annotations/test_annotations.json", "images"),
        "iiw": ("test_annotations.json", ""),
        "urban1k": ("annotations/annotations.json", "images"),
    }[dataset]
    ann, root = _file_and_root(path, image_root, default, rel)
    rows = []
    for i, r in enumerate(_annotation_rows(ann)):
        image = str(_field(r, "image", ann, i))
        rows.append((_field(r, "image_id", ann, i), [root / image], _field(r, "caption", ann, i)))
    if not rows:
        raise ValueError(f"{ann} has no annotations")
    return _pairs_to_data(rows, ann)


def load_dci(path: Path, image_root: str) -> RetrievalData:
    """DCI as ``read_dci_pairs``: every split of ``splits.json``, rejoined long text."""
    base = (
        path / "densely_captioned_images" if (path / "densely_captioned_images").is_dir() else path
    )
    splits_file = base / "splits.json"
    splits = _json(splits_file, "DCI splits file")
    names = [n for v in splits.values() for n in v]
    root = Path(image_root).expanduser() if image_root else base / "photos"
    rows = []
    for i, n in enumerate(names):
        f = base / "annotations" / n
        ann = _json(f, "DCI annotation")
        text = f"{_field(ann, 'short_caption', f, 0)}\n{_field(ann, 'extra_caption', f, 0)}"
        rows.append((i, [root / str(_field(ann, "image", f, 0))], rejoin(text)))
    if not rows:
        raise ValueError(f"{splits_file} lists no annotation files")
    return _pairs_to_data(rows, splits_file, names)


def load_iiw_long(path: Path, image_root: str) -> RetrievalData:
    """IIW long-caption retrieval as ``read_iiw_pairs(finegrained=False)``: DOCCI_Test,
    IIW-400 and DCI_Test ``data.jsonl`` in that order, rejoined ``IIW`` descriptions."""
    root = Path(image_root).expanduser() if image_root else path
    rows, ids = [], []
    for subset, folder in IIW_LONG_SUBSETS:
        f = path / subset / "data.jsonl"
        if not f.is_file():
            raise ValueError(f"IIW file not found: {f}")
        lines = [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
        for i, line in enumerate(lines):
            r = json.loads(line)
            key = "image" if "image" in r else "image/key"
            name = str(_field(r, key, f, i))
            name = name if ".jpg" in name else f"{name}.jpg"
            rows.append((len(rows), [root / folder / name], rejoin(str(_field(r, "IIW", f, i)))))
            ids.append(f"{subset}/{name}")
    return _pairs_to_data(rows, path, ids)


def load_sharegpt4v(path: Path, image_root: str, limit: int) -> RetrievalData:
    """ShareGPT4V-1k / -10k as ``read_sharegpt4v_pairs``: the first ``limit`` entries of
    ``share4v_sam_10k.json``, ``conversations[1]`` rejoined, ``/images`` taken out of the path."""
    f = path / "share4v_sam_10k.json" if path.is_dir() else path
    data = _json(f, "ShareGPT4V file")
    if not isinstance(data, list):
        raise ValueError(f"{f}: expected a JSON list of entries")
    if limit > len(data):
        raise ValueError(f"{f} has {len(data)} entries, fewer than limit={limit}")
    data = data[:limit] if limit > 0 else data
    root = Path(image_root).expanduser() if image_root else f.parent
    rows = []
    for i, r in enumerate(data):
        turns = _field(r, "conversations", f, i)
        if not isinstance(turns, list) or len(turns) < 2 or "value" not in turns[1]:
            raise ValueError(f"{f}: entry {i} has no field 'conversations[1].value'")
        name = str(_field(r, "image", f, i))
        released = name.replace("/images", "") if "images" in name else name
        rows.append((i, [root / released, root / name], rejoin(str(turns[1]["value"]))))
    return _pairs_to_data(rows, f, [str(r.get("id", i)) for i, r in enumerate(data)])


def load_flair_retrieval(
    dataset: str, path: Path, image_root: str, variant: str, limit: int
) -> RetrievalData:
    """Dispatch of ``variant="flair"`` / ``"flair_long"``; a one-line error names the valid
    datasets."""
    if variant == "flair_long" and dataset == "iiw":
        return load_iiw_long(path, image_root)
    if variant == "flair":
        if dataset in ("docci", "iiw", "urban1k"):
            return load_fixed_list(dataset, path, image_root)
        if dataset == "dci":
            return load_dci(path, image_root)
        if dataset == "sharegpt4v":
            return load_sharegpt4v(path, image_root, limit)
    valid = "docci, iiw, dci, urban1k, sharegpt4v" if variant == "flair" else "iiw"
    raise ValueError(
        f"retrieval dataset '{dataset}' has no FLAIR evaluation file for variant '{variant}'; "
        f"valid datasets: {valid}"
    )


def paper_retrieval_tasks(root: str, scoring: str = "conditioned") -> list[RetrievalTaskConfig]:
    """FLAIR's fine-grained and long retrieval table (DOCCI-FG, IIW-FG, DCI, IIW, SV-1k,
    SV-10k, Urban-1K) over FLAIR's files under ``root/<docci|imageinwords|dci|share4v|Urban1k>``
    (the released ``datasets/`` layout); ``scoring="conditioned"`` is ``--inference-with-flair``."""
    r = Path(root).expanduser()
    specs = [
        ("docci_fg", "docci", "docci", "flair", 0),
        ("iiw_fg", "iiw", "imageinwords", "flair", 0),
        ("dci", "dci", "dci", "flair", 0),
        ("iiw", "iiw", "imageinwords", "flair_long", 0),
        ("sharegpt4v_1k", "sharegpt4v", "share4v", "flair", 1000),
        ("sharegpt4v_10k", "sharegpt4v", "share4v", "flair", 10000),
        ("urban1k", "urban1k", "Urban1k", "flair", 0),
    ]
    return [
        RetrievalTaskConfig(
            name=f"flair/{name}",
            dataset=ds,
            path=str(r / sub),
            variant=v,
            limit=lim,
            scoring=scoring,
        )  # fmt: skip
        for name, ds, sub, v, lim in specs
    ]
