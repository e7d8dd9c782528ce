"""Sample sources: JSONL/CSV manifest + image folder, webdataset tar shards, sidecar JSONL.

A source produces *raw* samples ``{"key", "image", "record", "mask"}`` where ``image`` is
bytes, a path or a PIL image and ``record`` is the JSON side (dict, or undecoded bytes/str);
``make_sample`` decodes, validates (``finegrain.data.schema``) and transforms one raw sample into
the schema dict, raising ``BrokenSample`` for anything to skip and count.

Webdataset shards are read exactly as img2dataset writes them: members ``<key>.jpg|png|webp``,
``<key>.txt`` (caption) and ``<key>.json`` (metadata: our schema fields ride here), grouped by
key in tar order. Shard lists use brace expansion (``data/{00000..00099}.tar``) and several
lists mix with weights: ``"a/{0..9}.tar::0.7,b/{0..4}.tar::0.3"``.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from braceexpand import braceexpand
from PIL import Image

from finegrain.data.schema import BrokenSample, parse_record
from finegrain.data.transforms import SampleTransform, swap_left_right

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
KEY_CHECK_SAMPLES = 16  # fail fast when none of the first samples has a configured key


def decode_image(data: Any) -> Image.Image:
    """PIL RGB image from bytes, a path or a PIL image; ``BrokenSample('decode')`` on failure."""
    if isinstance(data, Image.Image):
        return data.convert("RGB") if data.mode != "RGB" else data
    try:
        if isinstance(data, (str, Path)):
            if not Path(data).is_file():
                raise BrokenSample("missing_image", f"image file not found: {data}")
            img = Image.open(data)
        else:
            img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except BrokenSample:
        raise
    except Exception as e:  # PIL raises many types for corrupt files
        raise BrokenSample("decode", f"cannot decode image: {e}") from None


def decode_record(data: Any) -> Any:
    if isinstance(data, dict):
        return data
    try:
        return json.loads(data)
    except (ValueError, TypeError) as e:
        raise BrokenSample("json", f"invalid JSON: {e}") from None


def decode_mask(data: Any, size: tuple[int, int]) -> np.ndarray:
    try:
        arr = data if isinstance(data, np.ndarray) else np.asarray(Image.open(io.BytesIO(data)))
    except Exception as e:
        raise BrokenSample("mask", f"cannot decode mask: {e}") from None
    if arr.shape[:2] != (size[1], size[0]):
        raise BrokenSample("mask", f"mask {arr.shape[:2]} does not match image {size[::-1]}")
    return arr[..., 0] if arr.ndim == 3 else arr


def make_sample(
    raw: dict[str, Any], transform: SampleTransform, seed: int, caption_key: str = "caption"
) -> dict[str, Any]:
    """Decode, validate and transform one raw sample into the schema dict (``views`` and
    ``view_regions`` too when the transform makes extra views)."""
    record = decode_record(raw["record"])
    fields = parse_record(record, raw["key"], caption_key)  # validates before decoding pixels
    if raw.get("image") is None:
        raise BrokenSample("missing_image", f"sample '{raw['key']}' has no image")
    image = decode_image(raw["image"])
    mask = None if raw.get("mask") is None else decode_mask(raw["mask"], image.size)
    out = transform.for_sample(image, fields["regions"], seed, mask)
    sample = {**fields, "seed": seed, "image": out.image, "regions": out.regions}
    if out.flipped:  # "on the left" becomes "on the right" in a mirrored image
        sample = flip_text(sample)
    if out.views is not None:
        sample["views"] = out.views
        sample["view_regions"] = out.view_regions or [[] for _ in out.views]
    if out.mask is not None:
        sample["mask"] = out.mask
    return sample


def flip_text(sample: dict[str, Any]) -> dict[str, Any]:
    """Swap 'left'/'right' in every text field of a horizontally flipped sample."""
    return {
        **sample,
        "caption": swap_left_right(sample["caption"]),
        "captions": [swap_left_right(c) for c in sample["captions"]],
        "long_caption": swap_left_right(sample["long_caption"]),
        "sentences": [swap_left_right(c) for c in sample["sentences"]],
        "regions": [{**r, "text": swap_left_right(r["text"])} for r in sample["regions"]],
    }


# ---- manifests ------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[Any]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            rows: list[Any] = []
            for row in csv.DictReader(f):
                for k, v in row.items():  # JSON-looking cells (captions lists) are parsed
                    if isinstance(v, str) and v[:1] in "[{":
                        try:
                            row[k] = json.loads(v)
                        except ValueError:
                            pass
                rows.append(row)
            return rows
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                rows.append(line)  # kept undecoded: counted as broken ('json') when read
    return rows


class ManifestSource:
    """JSONL/CSV rows ``{"image": relative/path.jpg, "caption" | "captions" | ..., "split"}``
    with images under ``image_root`` (default: the manifest's folder). Map-style."""

    def __init__(self, path: str, image_root: str = "", split: str = "",
                 caption_key: str = "caption") -> None:  # fmt: skip
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"manifest not found: {p}")
        self.root = Path(image_root).expanduser() if image_root else p.parent
        rows = _read_rows(p)
        good = [r for r in rows if isinstance(r, dict)]
        if split and any("split" in r for r in good):
            splits = sorted({str(r.get("split")) for r in good})
            if split not in splits:
                raise ValueError(
                    f"split '{split}' not in manifest {p}; splits: {', '.join(splits)}"
                )
            rows = [r for r in rows if not isinstance(r, dict) or r.get("split") == split]
        check_keys(good[:KEY_CHECK_SAMPLES], caption_key, str(p), image_keys=("image",))
        self.rows = rows
        self.name = p.stem

    def __len__(self) -> int:
        return len(self.rows)

    def raw(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        if not isinstance(row, dict):
            return {"key": f"{self.name}-{index}", "image": None, "record": str(row)}
        rel = row.get("image")
        record = {k: v for k, v in row.items() if k not in ("image", "split")}
        key = str(row.get("key", Path(str(rel)).stem if rel else f"{self.name}-{index}"))
        return {"key": key, "image": self.root / str(rel) if rel else None, "record": record}


def check_keys(records: list[dict], caption_key: str, where: str,
               image_keys: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Fail fast when none of the first records has the image key or any caption field."""
    if not records:
        return
    present = sorted({k for r in records for k in r})
    if image_keys and not any(k in r for r in records for k in image_keys):
        raise ValueError(
            f"{where}: none of the first {len(records)} samples has an image key "
            f"({' or '.join(image_keys)}); keys present: {', '.join(present)}"
        )
    # the default key accepts any caption field; an explicitly configured key must exist
    fields = (caption_key, "captions", "long_caption", "sentences")
    if caption_key != "caption":
        fields = (caption_key,)
    if not any(k in r for r in records for k in fields):
        raise ValueError(
            f"{where}: none of the first {len(records)} samples has the caption key "
            f"'{caption_key}'{' (nor captions/long_caption/sentences)' if len(fields) > 1 else ''}"
            f"; keys present: {', '.join(present)}. Set data.caption_key to one of them."
        )


# ---- webdataset shards ----------------------------------------------------------------------
def parse_shard_spec(spec: str) -> list[tuple[list[str], float]]:
    """``"a/{0..9}.tar::0.7,b.tar::0.3"`` -> [(shards, weight), ...]; missing local files are an
    error listing every path not found. Commas inside braces belong to the brace pattern."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out, missing = [], []
    for part in (p.strip() for p in parts if p.strip()):
        pattern, _, weight = part.partition("::")
        shards = list(braceexpand(pattern))
        missing += [s for s in shards if "://" not in s and not s.startswith("pipe:")
                    and not Path(s).expanduser().is_file()]  # fmt: skip
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            w = -1.0
        if not w > 0:
            raise ValueError(f"shard weight in '{part}' must be a positive number ('path::0.5')")
        out.append((shards, w))
    if not out:
        raise ValueError("data.train is empty: give a shard pattern like 'dir/{00000..00009}.tar'")
    if missing:
        shown = ", ".join(missing[:20]) + (
            f" ... ({len(missing)} in all)" if len(missing) > 20 else ""
        )
        raise FileNotFoundError(f"shards not found: {shown}")
    return out


def iter_tar(path: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard: ``{"__key__", "__shard__", ext: bytes}`` grouped by key."""
    if path.startswith("pipe:") or "://" in path:
        from webdataset import gopen

        stream = gopen(path, "rb")
    else:
        stream = open(Path(path).expanduser(), "rb")  # noqa: SIM115 (closed below)
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                if "." not in base or base.startswith("."):
                    continue
                prefix = member.name[: len(member.name) - len(base)]
                stem, ext = base.split(".", 1)
                key = prefix + stem
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__shard__": path}
                f = tar.extractfile(member)
                current[ext.lower()] = f.read() if f else b""
    except (tarfile.TarError, OSError) as e:
        raise OSError(f"cannot read shard {path}: {e}") from e
    finally:
        stream.close()
    if current is not None:
        yield current


def load_sidecar(path: str) -> dict[str, dict]:
    """JSONL ``{"key": ..., extra fields}`` -> {key: fields}."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"sidecar JSONL not found: {p}")
    out = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{p}:{n}: invalid JSON ({e})") from None
            if not isinstance(row, dict) or "key" not in row:
                raise ValueError(f"{p}:{n}: every sidecar line needs a 'key' field")
            out[str(row.pop("key"))] = row
    return out


def wds_raw(sample: dict[str, Any], caption_key: str, image_exts: tuple[str, ...],
            sidecar: dict[str, dict] | None = None) -> dict[str, Any]:  # fmt: skip
    """Raw sample from webdataset members. The caption comes from ``json[caption_key]``, else
    from the member with extension ``caption_key``, else (default key only) from ``txt``."""
    key = sample["__key__"].rsplit("/", 1)[-1]
    image = next((sample[e] for e in image_exts if e in sample), None)
    text_ext = caption_key if caption_key in sample else "txt" if caption_key == "caption" else ""
    text = sample.get(text_ext)
    record: Any = sample.get("json", b"{}")
    if text is not None or sidecar:
        try:  # an invalid JSON stays bytes and is counted as broken by make_sample
            record = decode_record(record)
        except BrokenSample:
            return {"key": key, "image": image, "record": record}
        if isinstance(record, dict):
            record = dict(record)
            if text is not None and caption_key not in record:
                record[caption_key] = text.decode("utf-8", "replace").strip()
            if sidecar and key in sidecar:
                record.update(sidecar[key])
    return {"key": key, "image": image, "record": record,
            "mask": sample.get("mask.png", sample.get("mask"))}  # fmt: skip


def wds_key_check(samples: list[dict], caption_key: str, image_exts: tuple[str, ...],
                  where: str) -> None:  # fmt: skip
    """Fail fast (a known OpenCLIP hang) when the first samples lack the configured keys."""
    if not samples:
        return
    exts = sorted({k for s in samples for k in s if not k.startswith("__")})
    if not any(e in s for s in samples for e in image_exts):
        raise ValueError(
            f"{where}: none of the first {len(samples)} samples has an image extension "
            f"({', '.join(image_exts)}); extensions present: {', '.join(exts)}"
        )
    records = []
    for s in samples:
        try:
            r = decode_record(s.get("json", b"{}"))
        except BrokenSample:
            continue
        if isinstance(r, dict):
            has_text = caption_key in s or (caption_key == "caption" and "txt" in s)
            records.append({**r, **({caption_key: 1} if has_text else {})})
    if records:
        check_keys(records, caption_key, where)
