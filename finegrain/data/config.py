"""Data configs. The data pipeline owns image decoding, box-aware transforms and the sample
schema; text tokenization/caption sampling is done by the method's collate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from finegrain.config import Checked


@dataclass
class SyntheticConfig(Checked):
    """The built-in synthetic scenes (see ``finegrain.data.synthetic``)."""

    num_samples: int = 2048  # size of one epoch of training scenes
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 4
    box_jitter: float = 0.0  # imitate detector noise on region boxes (fraction of box size)
    drop_region_prob: float = 0.0  # imitate missed detections
    novel_object_prob: float = 0.1  # chance an object is a novel shape (described, never named)
    # share of training scenes that are spurious-correlation scenes (finegrain.data.
    # synthetic_spurious): one object of a spurious class whose background tone predicts it
    spurious_share: float = 0.0
    spurious_correlation: float = 0.95  # in those scenes, P(background tone = the class's tone)


@dataclass
class DataConfig(Checked):
    source: Literal["synthetic", "jsonl", "csv", "wds"] = "synthetic"
    train: str = ""  # manifest path or shard pattern ("a/{000..009}.tar"; "p1::0.7,p2::0.3" mixes)
    image_root: str = ""  # images of a manifest ('' = the manifest's folder)
    split: str = "train"  # keep manifest rows whose "split" equals this ('' = all rows)
    batch_size: int = 32  # per rank
    num_workers: int = 0
    image_size: int = 64
    # none | rrc (random resized crop) | squash (GRAIN-style resize)
    augment: Literal["none", "rrc", "squash"] = "rrc"
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = False  # random horizontal flip; 'left'/'right' in the texts are swapped with it
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    resampled: bool = False  # webdataset: infinite sampling with replacement
    shuffle_buffer: int = 1000
    max_broken_fraction: float = 0.1  # stop when more than this fraction of samples is broken
    min_broken_check: int = 50  # samples seen before max_broken_fraction is enforced
    caption_key: str = "caption"  # JSON key (or webdataset extension, e.g. "txt") of the alt-text
    image_key: str = "jpg;png;webp;jpeg"  # webdataset extensions tried for the image, in order
    sidecar: str = ""  # JSONL joined by "key" onto wds samples (extra fields: regions, ...)
    epoch_samples: int = 0  # wds: samples per epoch over all ranks (0 = one pass over shards)
    min_box_visible: float = 0.25  # drop a region keeping less than this fraction after a crop
    load_masks: bool = False  # decode `mask.png` members into sample["mask"] (evaluation data)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # locked-tower feature cache (finegrain.data.feature_cache): '' = off, 'auto' = under
    # $FINEGRAIN_HOME/cache/features, or a folder. The towers' frozen bottoms run once per image
    # crop and per caption; needs lock_frozen towers and a map-style source (jsonl/csv/synthetic)
    feature_cache: str = ""
    cache_crops: int = 1  # K fixed crops per image (1: the eval transform; K > 1: K seeded crops)
