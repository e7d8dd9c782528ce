"""Write and inspect webdataset shards in img2dataset's layout.

Each sample is ``<key>.jpg`` (or ``.png``/``.webp``), ``<key>.txt`` (the caption) and
``<key>.json`` (metadata + our schema fields: captions, long_caption, sentences, regions, label);
synthetic shards add ``<key>.mask.png`` (semantic mask). Shards are ``00000.tar, 00001.tar, ...``
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from finegrain.data.config import SyntheticConfig
from finegrain.data.schema import BrokenSample, parse_record
from finegrain.data.sources import (
    IMAGE_EXTS,
    _read_rows,
    decode_image,
    decode_record,
    inside_root,
    parse_shard_spec,
    read_jsonl_numbered,
)
from finegrain.data.tars import iter_tar


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    tar.addfile(info, io.BytesIO(data))


def encode_image(image: Image.Image, fmt: str = "jpg") -> bytes:
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        image.convert("RGB").save(buf, "JPEG", quality=95)
    elif fmt in ("png", "webp"):
        image.save(buf, fmt.upper())
    else:
        raise ValueError(f"unknown image format '{fmt}'; valid choices: jpg, png, webp")
    return buf.getvalue()


def write_shards(
    samples: Iterable[dict[str, Any]], out_dir: str | Path, shard_size: int = 1000
) -> list[str]:
    """Write samples ``{"key", "image": bytes, "ext", "txt", "json": dict, "mask"?: np}``."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    tar: tarfile.TarFile | None = None
    for n, s in enumerate(samples):
        if n % shard_size == 0:
            if tar is not None:
                tar.close()
            paths.append(str(out / f"{len(paths):05d}.tar"))
            tar = tarfile.open(paths[-1], "w")
        key = s["key"]
        _add(tar, f"{key}.{s['ext']}", s["image"])
        _add(tar, f"{key}.txt", s.get("txt", "").encode())
        _add(tar, f"{key}.json", json.dumps({"key": key, **s["json"]}).encode())
        if s.get("mask") is not None:
            buf = io.BytesIO()
            Image.fromarray(np.asarray(s["mask"]).astype(np.uint8), "L").save(buf, "PNG")
            _add(tar, f"{key}.mask.png", buf.getvalue())
    if tar is not None:
        tar.close()
    return paths


MAX_SKIPPED_SHOWN = 200  # skipped rows listed one by one in the convert report


def _numbered_rows(path: Path) -> list[tuple[int, Any]]:
    """(source line, row) of a JSONL or CSV manifest (CSV: header is line 1)."""
    if path.suffix.lower() == ".csv":
        return [(i + 2, r) for i, r in enumerate(_read_rows(path))]
    return read_jsonl_numbered(path)


def _check_row(row: Any, root: Path, confined: bool) -> tuple[Path, bytes, Image.Image]:
    """(path, bytes, decoded image) of a manifest row, ``BrokenSample`` when it is unusable:
    bad JSON/types, no caption, bad boxes, an image path outside the root, missing or
    undecodable image (every image is fully decoded: 0-byte and truncated JPEGs are caught)."""
    if not isinstance(row, dict):
        raise BrokenSample("json", "invalid JSON (or not an object)")
    rel = row.get("image")
    if not isinstance(rel, str) or not rel:
        raise BrokenSample("missing_image", "no 'image' field")
    if confined and not inside_root(root, rel):
        raise BrokenSample("path", f"image path escapes the dataset root {root}")
    parse_record({k: v for k, v in row.items() if k not in ("image", "split")}, rel)
    path = root / rel
    if not path.is_file():
        raise BrokenSample("missing_image", f"image file not found: {path}")
    data = path.read_bytes()
    if not data:
        raise BrokenSample("decode", "empty (0-byte) image file")
    return path, data, decode_image(data)


def _manifest_samples(rows: list[tuple[int, Any]], root: Path, confined: bool,
                      report: dict[str, Any]) -> Iterator[dict]:  # fmt: skip
    for i, (line, row) in enumerate(rows):
        try:
            path, data, image = _check_row(row, root, confined)
        except BrokenSample as e:
            report["by_reason"][e.reason] += 1
            if len(report["skipped"]) < MAX_SKIPPED_SHOWN:
                rel = row.get("image") if isinstance(row, dict) else None
                report["skipped"].append({"line": line, "image": rel, "reason": e.reason,
                                          "detail": e.detail or e.reason})  # fmt: skip
            continue
        ext = path.suffix.lower().lstrip(".")
        if ext not in IMAGE_EXTS:  # re-encode formats webdataset readers do not expect
            data, ext = encode_image(image, "jpg"), "jpg"
        rel = row["image"]
        meta = {k: v for k, v in row.items() if k not in ("image",)}
        caption = meta.get("caption") or next(iter(meta.get("captions") or []), "")
        report["written"] += 1
        yield {
            "key": f"{i:09d}",
            "image": data,
            "ext": "jpeg" if ext == "jpeg" else ext,
            "txt": caption,
            "json": {"source_image": str(rel), **meta},
        }


def prepare_output(out: str | Path, overwrite: bool) -> list[str]:
    """Refuse a non-empty output folder unless ``overwrite``; then delete its old ``*.tar``
    shards (so two conversions never mix). Returns the removed shard paths."""
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--out {folder} is a file, not a folder")
    existing = sorted(folder.iterdir()) if folder.is_dir() else []
    if existing and not overwrite:
        raise ValueError(
            f"output folder {folder} is not empty ({len(existing)} entries, e.g. "
            f"{existing[0].name}); pass --overwrite to replace its shards or choose a new folder"
        )
    removed = [str(p) for p in existing if p.suffix == ".tar" and p.is_file()]
    for p in removed:
        Path(p).unlink()
    return removed


def convert_manifest(
    manifest: str,
    images: str,
    out: str,
    shard_size: int = 1000,
    split: str = "",
    overwrite: bool = False,
    layout: str = "plain",
    image_column: str = "image",
) -> dict[str, Any]:
    """JSONL/CSV manifest + image folder -> shards, every row validated and every image decoded
    first. Returns the shard paths, counts by skip reason and the skipped rows (source line,
    image, reason). With ``images`` given, image paths may not escape that folder.
    ``layout="dreamlip"``: a DreamLIP caption CSV (``finegrain.data.dreamlip``)."""
    if layout not in ("plain", "dreamlip"):
        raise ValueError(f"unknown layout '{layout}'; valid choices: plain, dreamlip")
    p = Path(manifest).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"manifest not found: {p}")
    root = Path(images).expanduser() if images else p.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    if layout == "dreamlip":
        from finegrain.data.dreamlip import read_dreamlip_csv

        # line numbers of a CSV: the header is line 1
        rows = list(enumerate(read_dreamlip_csv(p, image_column), start=2))
    else:
        rows = _numbered_rows(p)
    if split:
        rows = [(n, r) for n, r in rows if not isinstance(r, dict) or r.get("split") == split]
    removed = prepare_output(out, overwrite)
    report: dict[str, Any] = {"written": 0, "by_reason": Counter(), "skipped": []}
    shards = write_shards(_manifest_samples(rows, root, bool(images), report), out, shard_size)
    by_reason = dict(report["by_reason"])
    return {"shards": shards, "written": report["written"],
            "missing_image": by_reason.get("missing_image", 0),
            "bad_json": by_reason.get("json", 0), "skipped_by_reason": by_reason,
            "skipped": report["skipped"], "removed_old_shards": len(removed)}  # fmt: skip


def synthesize(
    out: str,
    num: int,
    image_size: int = 64,
    seed: int = 0,
    shard_size: int = 1000,
    cfg: SyntheticConfig | None = None,
    fmt: str = "jpg",
) -> list[str]:
    """Synthetic training scenes ``0..num-1`` (the same as ``SyntheticScenes``) -> shards."""
    from finegrain.data.synthetic import scene_record
    from finegrain.data.synthetic_spurious import training_scene

    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    cfg = cfg or SyntheticConfig(seed=seed)

    def samples() -> Iterator[dict]:
        for i in range(num):
            scene = training_scene(cfg, i, image_size)
            yield {
                "key": f"{i:09d}",
                "image": encode_image(scene["image"], fmt),
                "ext": fmt,
                "txt": scene["caption"],
                "json": scene_record(scene),
                "mask": scene["semantic_mask"],
            }

    return write_shards(samples(), out, shard_size)


def _check(sample: dict[str, Any]) -> str | None:
    """The broken reason of one shard sample, or None when it is good."""
    if "__broken__" in sample:
        return sample["__broken__"]
    try:
        record = decode_record(sample.get("json", b"{}"))
        if isinstance(record, dict) and "txt" in sample and "caption" not in record:
            record = {**record, "caption": sample["txt"].decode("utf-8", "replace")}
        parse_record(record, sample["__key__"])
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if image is None:
            raise BrokenSample("missing_image")
        decode_image(image)
    except BrokenSample as e:
        return e.reason
    return None


def inspect_shards(spec: str, max_examples: int = 5) -> dict[str, Any]:
    """Counts, fields present (extensions and JSON keys) and broken samples of shards."""
    sources = parse_shard_spec(spec)
    shards = [s for shard_list, _ in sources for s in shard_list]
    per_shard, exts, keys, broken = {}, Counter(), Counter(), Counter()
    examples: list[dict[str, str]] = []
    bad_shards: dict[str, str] = {}
    for shard in shards:
        n = 0
        for sample in iter_tar(shard):
            if "__broken__" in sample:  # a truncated/unreadable shard: reported, not a sample
                bad_shards[shard] = sample.get("__detail__", sample["__broken__"])
                broken[sample["__broken__"]] += 1
                if len(examples) < max_examples:
                    examples.append({"shard": shard, "key": sample["__key__"],
                                     "reason": sample["__broken__"]})  # fmt: skip
                continue
            n += 1
            exts.update(k for k in sample if not k.startswith("__"))
            try:
                rec = json.loads(sample.get("json", b"{}"))
                keys.update(list(rec) if isinstance(rec, dict) else [])
            except ValueError:
                pass
            reason = _check(sample)
            if reason:
                broken[reason] += 1
                if len(examples) < max_examples:
                    examples.append({"shard": shard, "key": sample["__key__"], "reason": reason})
        per_shard[shard] = n
    total = sum(per_shard.values())
    return {
        "shards": len(shards),
        "samples": total,
        "per_shard": per_shard,
        "extensions": dict(exts),
        "json_keys": dict(keys),
        "broken": sum(broken.values()),
        "broken_by_reason": dict(broken),
        "broken_examples": examples,
        "bad_shards": bad_shards,
        "clean": not broken and not bad_shards,
    }
