"""Data pipeline throughput: finegrain's training loader vs OpenCLIP's webdataset pipeline.

Both read the same synthetic shards (written to a temp dir by ``finegrain data synthesize``) and
do the full per-sample work of a training step: decode the image, random-resized-crop + normalise,
tokenize captions with OpenCLIP's CLIP BPE tokenizer, collate into a batch. OpenCLIP's side is
``open_clip_train.data.get_wds_dataset`` when importable, else the same pipeline rebuilt from its
parts (``wds.WebDataset -> shuffle -> decode("pilrgb") -> rename -> map_dict(preprocess,
tokenize) -> to_tuple -> batched``). Ours additionally validates the schema JSON, moves region
boxes and derives per-sample seeds. Each pipeline's iterator is created once; a timed call
pulls ``--batches`` batches, round-robin over the pipelines after a warm-up call
(``benchmarks._common.time_interleaved``), median reported. With ``--workers`` > 0 a pipeline's
prefetch queue (2 x workers batches) refills while the others are timed, so choose
``--batches`` well above that.

    python benchmarks/bench_data.py --quick             # 128 samples, 6 batches x 2 repeats
    python benchmarks/bench_data.py                     # small CPU defaults
    python benchmarks/bench_data.py --num 2048 --image-size 224 --workers 4

Prints one JSON object: samples/s per worker (num_workers=0 runs in the main process: the
throughput of one worker), ratios (speed, higher is better; >= 1 means we are not slower):
``data_speed_ratio`` = ours / open_clip samples/s with one caption per image,
``k_caption_data_speed_ratio`` = ours with ``--k`` captions per image / open_clip with one; and
the synthetic generator's images/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info, print_json, time_interleaved  # noqa: E402
from finegrain.data.schema import sample_rng


class KCaptionCollate:
    """A simple collate: K captions per image (sentences of the long caption, else captions),
    chosen with the sample's seed, tokenized with the CLIP tokenizer (picklable)."""

    def __init__(self, tokenizer, k: int) -> None:
        self.tokenizer, self.k = tokenizer, k

    def __call__(self, samples: list[dict]) -> dict:
        texts = []
        for s in samples:
            pool = s["sentences"] or s["captions"] or [s["caption"]]
            rng = sample_rng(s["seed"], "caption")
            texts += [s["caption"]] if self.k == 1 else [rng.choice(pool) for _ in range(self.k)]
        tokens = self.tokenizer(texts)  # (B * K, L)
        return {"image": torch.stack([s["image"] for s in samples]),
                "texts": tokens.view(len(samples), self.k, -1)}  # fmt: skip


def ours(pattern: str, args, k: int) -> Any:
    import open_clip

    from finegrain.data import DataConfig, build_train_loader

    cfg = DataConfig(source="wds", train=pattern, batch_size=args.batch_size,
                     image_size=args.image_size, num_workers=args.workers, augment="rrc",
                     crop_scale=(0.9, 1.0), shuffle_buffer=args.shuffle)  # fmt: skip
    loader = build_train_loader(cfg, KCaptionCollate(open_clip.get_tokenizer("ViT-B-32"), k))
    return _pull(iter(loader), args.batches)


def openclip(pattern: str, args) -> Any:
    import open_clip
    import webdataset as wds

    preprocess = open_clip.image_transform(args.image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(pattern),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.shuffle(args.shuffle),
        wds.decode("pilrgb"),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda t: tokenizer(t)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(args.batch_size, partial=False),
    ).repeat()  # endless, like our loader
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=args.workers)
    return _pull(iter(loader), args.batches)


def _pull(it, n: int) -> Any:
    """A closure taking the next ``n`` batches of the (persistent) iterator ``it``."""

    def run() -> None:
        for _ in range(n):
            next(it)

    return run


def generator_speed(size: int, n: int) -> float:
    from finegrain.data.synthetic import generate_scene

    start = time.perf_counter()
    for i in range(n):
        generate_scene(i, size)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="128 samples, 6 batches x 2 (CPU preset)")
    p.add_argument("--num", type=int, default=256, help="synthetic samples in the shards")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=12, help="timed batches per call")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0 = main process)")
    p.add_argument("--shuffle", type=int, default=100)
    p.add_argument("--k", type=int, default=4, help="captions per image for the K-caption run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="recorded only: the pipelines run on CPU")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.num, args.batches, args.repeats = 128, 6, 2
    torch.set_num_threads(args.threads)
    from finegrain.data.shards import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        paths = synthesize(tmp, args.num, args.image_size, seed=0, shard_size=max(1, args.num // 4))
        pattern = f"{tmp}/{{00000..{len(paths) - 1:05d}}}.tar"
        fns = {"ours_k1": ours(pattern, args, 1), "open_clip": openclip(pattern, args),
               f"ours_k{args.k}": ours(pattern, args, args.k)}  # fmt: skip
        t = time_interleaved(fns, repeats=args.repeats, warmup=1)
    per_worker = args.batches * args.batch_size / max(1, args.workers)
    rate = {k: per_worker / v["median_s"] for k, v in t.items()}
    return {
        "benchmark": "data_pipeline",
        "config": vars(args),
        "samples_per_s_per_worker": {k: round(v, 1) for k, v in rate.items()},
        "data_speed_ratio": rate["ours_k1"] / rate["open_clip"],
        "k_caption_data_speed_ratio": rate[f"ours_k{args.k}"] / rate["open_clip"],
        "generator_images_per_s": {
            "64": round(generator_speed(64, 200 if not args.quick else 50), 1),
            "224": round(generator_speed(224, 50 if not args.quick else 10), 1),
        },
        "machine": machine_info("cpu"),
    }


if __name__ == "__main__":
    print_json(main())
