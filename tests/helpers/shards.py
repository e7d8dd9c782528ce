"""Webdataset shards for loader and CLI tests: a tar writer and a shard with broken samples."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from finegrain.data.shards import encode_image
from finegrain.data.synthetic import generate_scene, scene_record


def tar_shard(path: Path, members: list[tuple[str, bytes]]) -> str:
    """Write ``members`` (name, bytes) into an uncompressed tar at ``path``."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def good_members(i: int) -> list[tuple[str, bytes]]:
    scene = generate_scene(i, 32)
    return [
        (f"{i:04d}.jpg", encode_image(scene["image"])),
        (f"{i:04d}.txt", b"alt text"),
        (f"{i:04d}.json", json.dumps(scene_record(scene)).encode()),
    ]


def bad_shard(tmp_path: Path) -> str:
    """Five broken samples first, then 12 good ones."""
    ok = encode_image(Image.new("RGB", (32, 32)))
    members = [("b1.jpg", b"not a jpeg"), ("b1.txt", b"x"), ("b1.json", b"{}")]
    members += [("b2.jpg", ok), ("b2.txt", b"x"), ("b2.json", b"{broken json")]
    box = {"regions": [{"text": "t", "box": [0.1, 0.1, 1.7, 0.5]}]}
    members += [("b3.jpg", ok), ("b3.txt", b"x"), ("b3.json", json.dumps(box).encode())]
    flipped = {"regions": [{"text": "t", "box": [0.6, 0.1, 0.2, 0.5]}]}
    members += [("b4.jpg", ok), ("b4.txt", b"x"), ("b4.json", json.dumps(flipped).encode())]
    members += [("b5.jpg", ok), ("b5.json", b"{}")]  # no caption anywhere
    members += [m for i in range(12) for m in good_members(i)]
    return tar_shard(tmp_path / "bad.tar", members)
