"""Loaders for the real annotation formats of the evaluation datasets.

Retrieval: COCO captions JSON (``captions_val2017.json``), Karpathy split JSON
(``dataset_coco.json``, ``dataset_flickr30k.json``), caption manifests (JSONL/CSV with
``image`` + ``caption``/``captions``; Flickr8k's ``captions.jsonl``), DOCCI
(``docci_descriptions.jsonlines``) and IIW (``IIW-400/data.jsonl``) for fine-grained
sentence-level retrieval, DCI (``densely_captioned_images/{splits.json,annotations,photos}``),
Urban-1K (``image/*.jpg`` + ``caption/*.txt``) and ShareGPT4V (``share-captioner_*.json``)
for long-caption retrieval, webdataset shards (``jpg``/``png`` + ``txt``). FLAIR's own
evaluation files (fixed DOCCI-FG / IIW-FG sentence lists, its long-retrieval files) load with
``variant="flair"`` from ``finegrain.eval.flair_files``; these loaders re-split the originals.
Classification: ImageFolder, JSONL/CSV manifests (``image`` + ``label``), webdataset (``cls``).
Segmentation: VOC-style folders (``JPEGImages``, ``SegmentationClass`` palette PNGs,
``ImageSets/Segmentation/<split>.txt``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image

from finegrain.data.captions import split_sentences
from finegrain.eval.containers import ImageItem, RetrievalData
from finegrain.eval.templates import voc_classnames

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ValueError(f"{what} not found: {path}")
    return path


def _check_images(paths: list[Path], annotation: Path | str) -> None:
    for p in paths:
        if not p.is_file():
            raise ValueError(f"image {p} referenced by {annotation} does not exist")


def _pick_root(annotation: Path, image_root: str, first: str, candidates: list[Path]) -> Path:
    """The image folder: ``image_root`` if given, else the first candidate holding ``first``."""
    if image_root:
        return Path(image_root).expanduser()
    for c in candidates:
        if (c / first).is_file():
            return c
    return candidates[0]


def _read_rows(path: Path) -> list[dict]:
    _need_file(path, "manifest")
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def retrieval_from_lists(
    images: list[ImageItem], captions: list, ids: list[str] | None = None
) -> RetrievalData:
    """Flatten per-image caption lists (or single strings) into a ``RetrievalData``."""
    texts, owner = [], []
    for i, caps in enumerate(captions):
        for c in [caps] if isinstance(caps, str) else caps:
            texts.append(str(c))
            owner.append(i)
    return RetrievalData(list(images), texts, owner, ids or [])


def limit_retrieval(data: RetrievalData, n: int) -> RetrievalData:
    """The first ``n`` images and their texts (``n <= 0``: unchanged)."""
    if n <= 0 or n >= len(data.images):
        return data
    keep = [j for j, i in enumerate(data.text_to_image) if i < n]
    return RetrievalData(
        data.images[:n],
        [data.texts[j] for j in keep],
        [data.text_to_image[j] for j in keep],
        data.image_ids[:n],
    )


def load_caption_manifest(path: Path, image_root: str, split: str) -> RetrievalData:
    """JSONL/CSV rows ``{"image": rel, "caption": str | "captions": [str], "split": s}``."""
    rows = [r for r in _read_rows(path) if not split or r.get("split", split) == split]
    if not rows:
        raise ValueError(f"no rows with split '{split}' in {path}")
    root = Path(image_root).expanduser() if image_root else path.parent
    images = [root / r["image"] for r in rows]
    _check_images(images, path)
    caps = []
    for r in rows:
        c = r.get("captions") or r.get("caption")
        if isinstance(c, str) and c.startswith("["):
            c = json.loads(c)  # CSV cell holding a JSON list
        if not c:
            raise ValueError(f"row for {r['image']} in {path} has no caption")
        caps.append(c)
    return retrieval_from_lists(images, caps, [str(r["image"]) for r in rows])


def load_coco_captions(path: Path, image_root: str) -> RetrievalData:
    """COCO captions JSON: ``images: [{id, file_name}]``, ``annotations: [{image_id, caption}]``."""
    data = json.loads(_need_file(path, "COCO captions file").read_text(encoding="utf-8"))
    by_id: dict[int, list[str]] = {}
    for a in data["annotations"]:
        by_id.setdefault(a["image_id"], []).append(a["caption"].strip())
    entries = [im for im in data["images"] if im["id"] in by_id]
    if not entries:
        raise ValueError(f"{path} holds no captioned images")
    first = entries[0]["file_name"]
    root = _pick_root(
        path,
        image_root,
        first,
        [path.parent, path.parent.parent / "val2017", path.parent / "val2017"],
    )
    images = [root / im["file_name"] for im in entries]
    _check_images(images, path)
    return retrieval_from_lists(
        images, [by_id[im["id"]] for im in entries], [str(im["id"]) for im in entries]
    )


def load_karpathy(path: Path, image_root: str, split: str) -> RetrievalData:
    """Karpathy split JSON (COCO, Flickr30k): ``images: [{filepath?, filename, split,
    sentences: [{raw}]}]``; ``restval`` counts as train."""
    data = json.loads(_need_file(path, "Karpathy split file").read_text(encoding="utf-8"))
    entries = [im for im in data["images"] if not split or im["split"] == split]
    if not entries:
        splits = sorted({im["split"] for im in data["images"]})
        raise ValueError(f"no images with split '{split}' in {path}; splits there: {splits}")

    def rel(im: dict) -> str:
        return f"{im['filepath']}/{im['filename']}" if im.get("filepath") else im["filename"]

    root = _pick_root(
        path,
        image_root,
        rel(entries[0]),
        [path.parent, path.parent / "images", path.parent / "flickr30k-images"],
    )
    images = [root / rel(im) for im in entries]
    _check_images(images, path)
    caps = [[s["raw"].strip() for s in im["sentences"]] for im in entries]
    return retrieval_from_lists(images, caps, [rel(im) for im in entries])


def load_coco_or_karpathy(path: Path, image_root: str, split: str) -> RetrievalData:
    """``dataset=coco`` accepts both the official captions JSON and the Karpathy JSON."""
    head = json.loads(_need_file(path, "COCO annotation file").read_text(encoding="utf-8"))
    if "annotations" in head:
        return load_coco_captions(path, image_root)
    return load_karpathy(path, image_root, split)


def _sentence_or_long(
    images: list[Path], texts: list[str], ids: list[str], sentences: bool, path: Path
) -> RetrievalData:
    _check_images(images, path)
    if not sentences:
        return retrieval_from_lists(images, texts, ids)
    per_image = [split_sentences(t) for t in texts]
    empty = [ids[i] for i, s in enumerate(per_image) if not s]
    if empty:
        raise ValueError(f"images with an empty description in {path}: {empty[:5]}")
    return retrieval_from_lists(images, per_image, ids)


def load_docci(path: Path, image_root: str, split: str, sentences: bool = True) -> RetrievalData:
    """DOCCI ``docci_descriptions.jsonlines``: ``{example_id, split, image_file, description}``.
    ``sentences=True``: one query per sentence (FLAIR's DOCCI-FG); else the whole description."""
    if path.is_dir():
        path = path / "docci_descriptions.jsonlines"
    rows = [r for r in _read_rows(path) if not split or r["split"] == split]
    if not rows:
        raise ValueError(f"no DOCCI rows with split '{split}' in {path}")
    root = _pick_root(
        path, image_root, rows[0]["image_file"], [path.parent / "images", path.parent]
    )
    images = [root / r["image_file"] for r in rows]
    return _sentence_or_long(
        images, [r["description"] for r in rows], [r["example_id"] for r in rows], sentences, path
    )


def load_iiw(path: Path, image_root: str, sentences: bool = True) -> RetrievalData:
    """ImageInWords ``data.jsonl`` (IIW-400, DCI_Test, DOCCI_Test): ``{"image/key", "IIW"}``;
    images are ``<key>.jpg`` (DOCCI / DCI images) in ``image_root``."""
    if path.is_dir():
        path = path / "data.jsonl"
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path} is empty")
    key = "image/key" if "image/key" in rows[0] else "image"
    names = [r[key] if Path(str(r[key])).suffix else f"{r[key]}.jpg" for r in rows]
    root = _pick_root(
        path,
        image_root,
        names[0],
        [path.parent, path.parent / "images", path.parent / "images_aar"],
    )
    images = [root / n for n in names]
    return _sentence_or_long(
        images, [r["IIW"] for r in rows], [str(r[key]) for r in rows], sentences, path
    )


def load_dci(path: Path, image_root: str, split: str) -> RetrievalData:
    """DCI: ``splits.json`` ({split: [annotation file]}), ``annotations/*.json`` with
    ``image``, ``short_caption``, ``extra_caption``; images in ``photos/``. The long text is
    ``short_caption + " " + extra_caption``; ``split='all'`` uses every split (as LoTLIP)."""
    base = (
        path / "densely_captioned_images" if (path / "densely_captioned_images").is_dir() else path
    )
    splits = json.loads(_need_file(base / "splits.json", "DCI splits file").read_text())
    if split in ("", "all"):
        names = [n for v in splits.values() for n in v]
    elif split in splits:
        names = list(splits[split])
    else:
        raise ValueError(
            f"DCI split '{split}' not in {base / 'splits.json'}; valid: all, {', '.join(splits)}"
        )
    root = Path(image_root).expanduser() if image_root else base / "photos"
    images, texts = [], []
    for n in names:
        ann = json.loads(_need_file(base / "annotations" / n, "DCI annotation").read_text())
        images.append(root / ann["image"])
        texts.append(
            f"{ann['short_caption'].strip()} {ann.get('extra_caption', '').strip()}".strip()
        )
    _check_images(images, base / "annotations")
    return retrieval_from_lists(images, texts, names)


def load_urban1k(path: Path) -> RetrievalData:
    """Urban-1K: ``image/<stem>.jpg`` with ``caption/<stem>.txt``."""
    caps = sorted((path / "caption").glob("*.txt"))
    if not caps:
        raise ValueError(f"no caption/*.txt files under {path}")
    images = []
    for c in caps:
        found = [
            path / "image" / f"{c.stem}{e}"
            for e in IMAGE_EXTS
            if (path / "image" / f"{c.stem}{e}").is_file()
        ]
        if not found:
            raise ValueError(
                f"image {path / 'image' / (c.stem + '.jpg')} referenced by {c} does not exist"
            )
        images.append(found[0])
    texts = [c.read_text(encoding="utf-8").strip() for c in caps]
    return retrieval_from_lists(images, texts, [c.stem for c in caps])


def load_sharegpt4v(path: Path, image_root: str, limit: int) -> RetrievalData:
    """ShareGPT4V JSON list ``[{id, image, conversations: [{from, value}]}]``: the first
    ``gpt`` turn is the long caption. Long-CLIP evaluates on the first 1,000 (``limit=1000``)."""
    data = json.loads(_need_file(path, "ShareGPT4V file").read_text(encoding="utf-8"))
    data = data[:limit] if limit > 0 else data
    root = Path(image_root).expanduser() if image_root else path.parent
    images, texts = [], []
    for row in data:
        gpt = [t["value"] for t in row["conversations"] if t.get("from") == "gpt"]
        if not gpt:
            raise ValueError(f"ShareGPT4V entry {row.get('id')} in {path} has no gpt caption")
        images.append(root / row["image"])
        texts.append(gpt[0].strip())
    _check_images(images, path)
    return retrieval_from_lists(images, texts, [str(r.get("id", r["image"])) for r in data])


def _wds_samples(urls: str, limit: int) -> list[dict]:
    import webdataset as wds

    out = []
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"):
        out.append(s)
        if 0 < limit <= len(out):
            break
    if not out:
        raise ValueError(f"no samples in webdataset shards {urls}")
    return out


def _wds_image(s: dict, urls: str) -> Image.Image:
    for k in ("jpg", "jpeg", "png", "webp"):
        if k in s:
            return s[k]
    raise ValueError(f"sample {s['__key__']} in {urls} has no image; keys: {sorted(s)}")


def load_wds_retrieval(urls: str, limit: int) -> RetrievalData:
    """Shards with an image and ``txt`` (or ``json`` with ``caption``/``captions``) per key."""
    samples = _wds_samples(urls, limit)
    caps = []
    for s in samples:
        meta = s.get("json") or {}
        c = s.get("txt") or meta.get("captions") or meta.get("caption")
        if not c:
            raise ValueError(f"sample {s['__key__']} in {urls} has no caption (txt or json)")
        caps.append(c)
    return retrieval_from_lists(
        [_wds_image(s, urls) for s in samples], caps, [s["__key__"] for s in samples]
    )


def load_wds_classification(urls: str, limit: int) -> tuple[list[ImageItem], list[int]]:
    samples = _wds_samples(urls, limit)
    labels = []
    for s in samples:
        y = s.get("cls", (s.get("json") or {}).get("label"))
        if y is None:
            raise ValueError(f"sample {s['__key__']} in {urls} has no label (cls or json label)")
        labels.append(int(y))
    return [_wds_image(s, urls) for s in samples], labels


def load_imagefolder(path: Path, split: str) -> tuple[list[ImageItem], list[int], list[str]]:
    """``root[/split]/<class>/<image>``; class names are folder names with '_' as spaces."""
    root = path / split if split and (path / split).is_dir() else path
    folders = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not folders:
        raise ValueError(f"no class folders under {root}")
    images, labels = [], []
    for y, d in enumerate(folders):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ValueError(f"class folder {d} holds no images (empty class '{d.name}')")
        images += files
        labels += [y] * len(files)
    return images, labels, [d.name.replace("_", " ") for d in folders]


def load_class_manifest(
    path: Path, image_root: str, split: str, classnames: list[str] | None
) -> tuple[list[ImageItem], list[int], list[str]]:
    """JSONL/CSV rows ``{"image", "label": int | class name, "split"?}``."""
    rows = [r for r in _read_rows(path) if not split or r.get("split", split) == split]
    if not rows:
        raise ValueError(f"no rows with split '{split}' in {path}")
    raw = [str(r["label"]) for r in rows]
    if classnames is None:
        if all(v.lstrip("-").isdigit() for v in raw):
            raise ValueError(f"{path} has integer labels; give classnames= (a set name or file)")
        classnames = sorted(set(raw))
    index = {c: i for i, c in enumerate(classnames)}
    unknown = sorted({v for v in raw if v not in index and not v.isdigit()})
    if unknown:
        raise ValueError(f"labels {unknown[:10]} in {path} are not class names {classnames[:10]}")
    labels = [int(v) if v.isdigit() and v not in index else index[v] for v in raw]
    root = Path(image_root).expanduser() if image_root else path.parent
    images = [root / r["image"] for r in rows]
    _check_images(images, path)
    return images, labels, classnames


def load_voc(path: Path, split: str) -> tuple[list[ImageItem], list[Path], list[str]]:
    """VOC-style folder. Class names: ``classnames.txt`` there if present, else the 20 VOC
    classes (label 1..20; 0 background, 255 ignored)."""
    masks_dir, images_dir = path / "SegmentationClass", path / "JPEGImages"
    split_file = path / "ImageSets" / "Segmentation" / f"{split}.txt"
    if split_file.is_file():
        ids = [s.strip() for s in split_file.read_text().splitlines() if s.strip()]
    else:
        ids = sorted(p.stem for p in masks_dir.glob("*.png"))
    if not ids:
        raise ValueError(f"no segmentation masks under {masks_dir} (split '{split}')")
    masks = [masks_dir / f"{i}.png" for i in ids]
    images = [images_dir / f"{i}.jpg" for i in ids]
    ann = split_file if split_file.is_file() else masks_dir
    _check_images(masks, ann)
    _check_images(images, ann)
    names_file = path / "classnames.txt"
    names = (
        [n.strip() for n in names_file.read_text().splitlines() if n.strip()]
        if names_file.is_file()
        else voc_classnames()
    )
    return images, masks, names
