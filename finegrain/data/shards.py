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
    iter_tar,
    parse_shard_spec,
)


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


def _manifest_samples(rows: list[Any], root: Path, report: Counter) -> Iterator[dict]:
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            report["bad_json"] += 1
            continue
        rel = row.get("image")
        path = root / str(rel) if rel else None
        if path is None or not path.is_file():
            report["missing_image"] += 1
            continue
        ext = path.suffix.lower().lstrip(".")
        data = path.read_bytes()
        if ext not in IMAGE_EXTS:  # re-encode formats webdataset readers do not expect
            data, ext = encode_image(decode_image(data), "jpg"), "jpg"
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


def convert_manifest(
    manifest: str,
    images: str,
    out: str,
    shard_size: int = 1000,
    split: str = "",
    layout: str = "plain",
    image_column: str = "image",
) -> dict[str, Any]:
    """JSONL/CSV manifest + image folder -> shards. Returns counts and the shard paths.
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

        rows: list[Any] = list(read_dreamlip_csv(p, image_column))
    else:
        rows = _read_rows(p)
    if split:
        rows = [r for r in rows if not isinstance(r, dict) or r.get("split") == split]
    report: Counter = Counter()
    shards = write_shards(_manifest_samples(rows, root, report), out, shard_size)
    return {"shards": shards, **{k: report[k] for k in ("written", "missing_image", "bad_json")}}


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
    from finegrain.data.synthetic import generate_scene, scene_record, train_scene_seed

    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    cfg = cfg or SyntheticConfig(seed=seed)

    def samples() -> Iterator[dict]:
        for i in range(num):
            scene = generate_scene(train_scene_seed(cfg.seed, i), image_size, cfg=cfg)
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
    for shard in shards:
        n = 0
        for sample in iter_tar(shard):
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
    }
