"""GRAIN's data step over webdataset shards (Halbe et al., arXiv 2412.04429, data step).

For each image of each input shard (``jpg``/``png`` + ``txt`` + ``json``, as img2dataset writes):

1. the describer (an MLLM) writes a detailed caption and region descriptions (``parse``);
2. the grounder (an open-vocabulary detector) puts one box on each description, keeping it
   when its score reaches ``box_threshold``;
3. the result is written in the sample schema: ``long_caption`` and
   ``regions: [{text, box: [x0, y0, x1, y1] in 0..1, score}]``, either as a sidecar JSONL per
   shard (``{"key", "long_caption", "regions", "annotation"}``, joined by key at load time)
   or as a new shard with the original files and an updated ``json``.

Resumable: a finished shard's output exists under its final name (written to ``*.partial``
and renamed at the end) and is skipped; an interrupted JSONL keeps its lines and the keys in it
are skipped on restart (a tar cannot be appended to, so an interrupted shard in ``wds`` format
restarts). Parallel: shard i is processed by rank ``i % world_size`` (``RANK`` /
``WORLD_SIZE`` from the environment when not given). Bad input is counted, never fatal:
undecodable images (``broken``), unparseable MLLM answers (``unparseable``; kept without
regions), descriptions under the threshold (``below_threshold``).
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from PIL import Image

from finegrain.annotate.models import Describer, Grounder, HFDescriber, HFGrounder
from finegrain.annotate.parse import DEFAULT_PROMPT, parse_description
from finegrain.config import Checked

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
OutputFormat = Literal["jsonl", "wds"]  # jsonl: a sidecar; wds: new shards
FORMATS: tuple[str, ...] = get_args(OutputFormat)
STAT_KEYS = (
    "shards_done",
    "shards_skipped",
    "samples",
    "resumed_keys",
    "broken",
    "unparseable",
    "descriptions",
    "grounded",
    "below_threshold",
)


@dataclass
class AnnotateConfig(Checked):
    input: str = ""  # shards: "dir/{000..009}.tar", a glob, or a comma-separated list
    output_dir: str = ""
    describer: str = ""  # local HF image-text-to-text model directory
    detector: str = ""  # local HF zero-shot detector directory (OWLv2 / OWL-ViT / Grounding DINO)
    prompt: str = DEFAULT_PROMPT
    output_format: OutputFormat = "jsonl"
    box_threshold: float = 0.1
    max_regions: int = 8  # descriptions kept per image (before grounding)
    max_new_tokens: int = 256
    batch_size: int = 4  # images per MLLM call
    device: str = "cpu"
    rank: int = -1  # -1: $RANK or 0
    world_size: int = -1  # -1: $WORLD_SIZE or 1
    resume: bool = True
    progress: bool = True


def expand_shards(spec: str) -> list[str]:
    """Shard list from brace patterns, globs and commas, in a stable order."""
    from braceexpand import braceexpand

    out: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        for item in braceexpand(part):
            hits = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
            out.extend(hits)
    missing = [s for s in out if not Path(s).is_file()]
    if not out or missing:
        raise ValueError(
            f"no input shards found for '{spec}'" + (f"; missing: {missing[:3]}" if missing else "")
        )
    return out


def read_shard(path: str) -> Iterator[dict[str, Any]]:
    """Samples of a webdataset tar: {"__key__": key, ext: bytes, ...} grouped by key."""
    with tarfile.open(path) as tar:
        current: dict[str, Any] = {}
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            if "." not in base:
                continue
            key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
            ext = base.split(".", 1)[1].lower()
            if current and current["__key__"] != key:
                yield current
                current = {}
            current["__key__"] = key
            current[ext] = tar.extractfile(member).read()
        if current:
            yield current


def _decode(sample: dict[str, Any]) -> Image.Image | None:
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return None
    try:
        return Image.open(io.BytesIO(sample[ext])).convert("RGB")
    except Exception:  # any decoder error: counted as broken by the caller
        return None


def _meta(sample: dict[str, Any]) -> dict[str, Any]:
    try:
        meta = json.loads(sample.get("json", b"{}") or b"{}")
        return meta if isinstance(meta, dict) else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


class _Writer:
    """Sidecar JSONL (appendable) or a new tar shard; renamed to its final name on close."""

    def __init__(self, final: Path, fmt: str, resume: bool) -> None:
        self.final, self.fmt = final, fmt
        self.partial = final.with_name(final.name + ".partial")
        self.done_keys: set[str] = set()
        if fmt == "jsonl":
            if resume and self.partial.is_file():
                lines = self.partial.read_text().splitlines()
                good = [ln for ln in lines if ln.strip().endswith("}")]  # drop a torn last line
                self.partial.write_text("".join(ln + "\n" for ln in good))
                self.done_keys = {json.loads(ln)["key"] for ln in good}
            self.fh = open(self.partial, "a" if resume else "w")
        else:
            import webdataset as wds

            self.tar = wds.TarWriter(str(self.partial))

    def write(self, sample: dict[str, Any], record: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()
            return
        meta = _meta(sample)
        meta.update(
            long_caption=record["long_caption"],
            regions=record["regions"],
            annotation=record["annotation"],
        )
        out = {k: v for k, v in sample.items() if k not in ("json",)}
        out["json"] = json.dumps(meta).encode()
        self.tar.write(out)

    def close(self) -> None:
        (self.fh if self.fmt == "jsonl" else self.tar).close()
        os.replace(self.partial, self.final)


class Annotator:
    """Runs describer + grounder over shards; ``stats`` counts everything that happened."""

    def __init__(
        self,
        cfg: AnnotateConfig,
        describer: Describer | None = None,
        grounder: Grounder | None = None,
    ):
        if not cfg.output_dir:
            raise ValueError("annotate needs output_dir")
        self.cfg = cfg
        self.describer = describer or HFDescriber(
            cfg.describer, cfg.prompt, cfg.max_new_tokens, cfg.device
        )
        self.grounder = grounder or HFGrounder(cfg.detector, cfg.box_threshold, cfg.device)
        self.stats: Counter = Counter(dict.fromkeys(STAT_KEYS, 0))

    def _records(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        images = [_decode(s) for s in batch]
        ok = [i for i, im in enumerate(images) if im is not None]
        answers = self.describer.describe([images[i] for i in ok]) if ok else []
        by_index = dict(zip(ok, answers))
        records = []
        for i, s in enumerate(batch):
            key = s["__key__"].rsplit("/", 1)[-1]  # the key finegrain.data joins sidecars on
            rec = {
                "key": key,
                "long_caption": "",
                "regions": [],
                "annotation": {"status": "broken"},
            }
            if i in by_index:
                rec = self._annotate_one(key, images[i], by_index[i])
            else:
                self.stats["broken"] += 1
            records.append(rec)
        return records

    def _annotate_one(self, key: str, image: Image.Image, answer: str) -> dict[str, Any]:
        parsed = parse_description(answer, self.cfg.max_regions)
        self.stats["unparseable"] += int(not parsed.ok)
        self.stats["descriptions"] += len(parsed.regions)
        found = self.grounder.ground(image, parsed.regions)
        regions = [
            {"text": t, "box": list(f[0]), "score": round(f[1], 6)}
            for t, f in zip(parsed.regions, found)
            if f is not None
        ]
        self.stats["grounded"] += len(regions)
        self.stats["below_threshold"] += len(parsed.regions) - len(regions)
        status = "ok" if parsed.ok else "unparseable"
        return {
            "key": key,
            "long_caption": parsed.caption,
            "regions": regions,
            "annotation": {"status": status, "descriptions": len(parsed.regions)},
        }

    def run_shard(self, shard: str, pbar: Any = None) -> None:
        out_dir = Path(self.cfg.output_dir)
        stem = Path(shard).name.rsplit(".tar", 1)[0]
        final = out_dir / (f"{stem}.jsonl" if self.cfg.output_format == "jsonl" else f"{stem}.tar")
        if self.cfg.resume and final.is_file():
            self.stats["shards_skipped"] += 1
            return
        writer = _Writer(final, self.cfg.output_format, self.cfg.resume)
        batch: list[dict[str, Any]] = []

        def flush() -> None:
            for s, rec in zip(batch, self._records(batch)):
                writer.write(s, rec)
            self.stats["samples"] += len(batch)
            if pbar is not None:
                pbar.update(len(batch))
            batch.clear()

        for sample in read_shard(shard):
            if sample["__key__"].rsplit("/", 1)[-1] in writer.done_keys:
                self.stats["resumed_keys"] += 1
                continue
            batch.append(sample)
            if len(batch) >= self.cfg.batch_size:
                flush()
        if batch:
            flush()
        writer.close()
        self.stats["shards_done"] += 1


def rank_world(cfg: AnnotateConfig) -> tuple[int, int]:
    world = cfg.world_size if cfg.world_size > 0 else int(os.environ.get("WORLD_SIZE", 1))
    rank = cfg.rank if cfg.rank >= 0 else int(os.environ.get("RANK", 0))
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    return rank, world


def annotate(
    cfg: AnnotateConfig, describer: Describer | None = None, grounder: Grounder | None = None
) -> dict[str, int]:
    """Annotate this rank's shards (shard i -> rank i % world); returns the counts."""
    from tqdm import tqdm

    shards = expand_shards(cfg.input)
    rank, world = rank_world(cfg)
    mine = [s for i, s in enumerate(shards) if i % world == rank]
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    ann = Annotator(cfg, describer, grounder)
    with tqdm(desc=f"annotate[rank {rank}]", unit="img", disable=not cfg.progress) as pbar:
        for shard in mine:
            ann.run_shard(shard, pbar)
    ann.stats["shards_assigned"] = len(mine)
    return dict(ann.stats)


def merge_sidecars(output_dir: str, path: str) -> int:
    """Concatenate every finished per-shard JSONL of ``output_dir`` into one sidecar file
    (``data.sidecar=`` of a training run); returns the number of lines written."""
    parts = sorted(Path(output_dir).glob("*.jsonl"))
    if not parts:
        raise ValueError(f"no finished sidecar shards (*.jsonl) in {output_dir}")
    n = 0
    with open(path, "w") as out:
        for part in parts:
            for line in part.read_text().splitlines():
                if line.strip():
                    out.write(line + "\n")
                    n += 1
    return n
