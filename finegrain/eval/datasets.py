"""Evaluation datasets: one dispatch from a task config to a loader (containers live in
``finegrain.eval.containers``, file formats in ``finegrain.eval.formats``).

Images are kept as paths (decoded lazily, batch by batch) or as in-memory PIL images
(synthetic scenes, webdataset shards). Every loader checks that each image an annotation file
references exists, and names the missing file and the annotation file when one does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finegrain.config import finegrain_home
from finegrain.data.synthetic_sets import eval_split
from finegrain.eval import formats
from finegrain.eval.compositional_data import SYNTHETIC_VARIANTS as COMPOSITIONAL_VARIANTS
from finegrain.eval.config import EvalTaskConfig, ZeroShotTaskConfig
from finegrain.eval.containers import (
    ClassificationData,
    RetrievalData,
    SegmentationData,
)
from finegrain.eval.flair_files import FLAIR_VARIANTS, load_flair_retrieval
from finegrain.eval.hardneg_data import SYNTHETIC_VARIANTS as HARDNEG_VARIANTS
from finegrain.eval.region_data import SYNTHETIC_REGION_VARIANTS
from finegrain.eval.seg_formats import load_ade20k, load_coco_stuff
from finegrain.eval.task import task_object
from finegrain.eval.templates import load_classnames
from finegrain.registry import suggest

# ---- the built-in synthetic scenes --------------------------------------------------------
SYNTHETIC_KINDS = {
    "zeroshot": ("shape", "color_shape", "pattern_shape", "novel", "spurious"),
    "retrieval": ("retrieval", "sentences", "long"),
    "segmentation": ("segmentation", "color"),  # objects labelled by shape | by colour
    "region": SYNTHETIC_REGION_VARIANTS,  # finegrain.eval.region_data
    "hardneg": HARDNEG_VARIANTS,  # finegrain.eval.hardneg_data
    "compositional": COMPOSITIONAL_VARIANTS,  # finegrain.eval.compositional_data
}


def synthetic_split(kind: str, num: int, seed: int = 10_000, image_size: int = 64) -> dict:
    """Adapter over ``finegrain.data.synthetic_sets.eval_split`` (the data engineer's generator)."""
    return eval_split(kind, num, seed=seed, image_size=image_size)


def _synthetic(cfg: EvalTaskConfig, image_size: int) -> Any:
    kinds = SYNTHETIC_KINDS[cfg.task]
    kind = cfg.variant or kinds[0]
    if kind not in kinds:
        raise ValueError(
            f"synthetic {cfg.task} variant '{kind}'{suggest(kind, list(kinds))}; "
            f"valid choices: {', '.join(kinds)}"
        )
    split = "segmentation" if cfg.task == "segmentation" else kind
    d = synthetic_split(split, cfg.num_samples, image_size=image_size)
    if cfg.task == "zeroshot":
        return ClassificationData(
            list(d["images"]),
            [int(y) for y in d["labels"]],
            list(d["classnames"]),
            d.get("descriptions"),
        )
    if cfg.task == "segmentation":
        pre = "color_" if kind == "color" else ""
        return SegmentationData(
            list(d["images"]), list(d[f"{pre}masks"]), list(d[f"{pre}classnames"])
        )
    if kind == "sentences":
        return RetrievalData(
            list(d["images"]), list(d["texts"]), [int(i) for i in d["text_to_image"]]
        )
    caps = d.get("captions")
    if caps is None:
        caps = d.get("long_captions", d.get("texts"))
    return formats.retrieval_from_lists(list(d["images"]), caps)


# ---- dispatch -------------------------------------------------------------------------------
def _default_path(cfg: EvalTaskConfig) -> Path:
    if cfg.path:
        return Path(cfg.path).expanduser()
    return finegrain_home() / "data" / cfg.dataset


def _classification(cfg: ZeroShotTaskConfig, path: Path, root: str) -> ClassificationData:
    if cfg.dataset == "imagefolder":
        images, labels, names = formats.load_imagefolder(path, cfg.split)
    elif cfg.dataset == "manifest":
        names_given = load_classnames(cfg.classnames) if cfg.classnames else None
        images, labels, names = formats.load_class_manifest(path, root, cfg.split, names_given)
    else:  # wds
        images, labels = formats.load_wds_classification(str(path), cfg.limit)
        if not cfg.classnames:
            raise ValueError("dataset=wds for zeroshot needs classnames= (a set name or a file)")
        names = []
    if cfg.classnames:
        names = load_classnames(cfg.classnames)
    images, labels = _limit(images, cfg.limit), _limit(labels, cfg.limit)
    return ClassificationData(images, labels, names)


def _limit(items: list, n: int) -> list:
    return items[:n] if n > 0 else items


RETRIEVAL_FORMATS = {
    "flickr8k": lambda p, r, c: formats.load_caption_manifest(
        p / "captions.jsonl" if p.is_dir() else p, r, c.split
    ),
    "manifest": lambda p, r, c: formats.load_caption_manifest(p, r, c.split),
    "coco": lambda p, r, c: formats.load_coco_or_karpathy(p, r, c.split),
    "flickr30k": lambda p, r, c: formats.load_karpathy(p, r, c.split),
    "docci": lambda p, r, c: formats.load_docci(p, r, c.split, sentences=c.variant != "long"),
    "iiw": lambda p, r, c: formats.load_iiw(p, r, sentences=c.variant != "long"),
    "dci": lambda p, r, c: formats.load_dci(p, r, c.split),
    "urban1k": lambda p, r, c: formats.load_urban1k(p),
    "sharegpt4v": lambda p, r, c: formats.load_sharegpt4v(p, r, c.limit),
    "wds": lambda p, r, c: formats.load_wds_retrieval(str(p), c.limit),
}
CLASSIFICATION_FORMATS = ("imagefolder", "manifest", "wds")
SEGMENTATION_FORMATS = ("voc", "coco_stuff", "ade20k")  # finegrain.eval.seg_formats


def task_datasets(task: str) -> list[str]:
    """The datasets a task kind accepts (for ``finegrain eval --help`` and error messages):
    the core kinds' formats here, else the ``Literal`` choices of the kind's ``dataset`` field,
    else its ``DATASETS`` class attribute (task kinds added by other modules)."""
    import dataclasses
    import typing

    from finegrain.eval.config import task_config_class
    from finegrain.eval.grouping import GROUPING_DATASETS

    core = {"retrieval": list(RETRIEVAL_FORMATS), "zeroshot": list(CLASSIFICATION_FORMATS),
            "segmentation": list(SEGMENTATION_FORMATS), "grouping": list(GROUPING_DATASETS)}  # fmt: skip
    if task in core:
        return list(dict.fromkeys(["synthetic", *core[task]]))
    cls = task_config_class(task)
    hints = typing.get_type_hints(cls)
    if typing.get_origin(hints.get("dataset")) is typing.Literal:
        return list(typing.get_args(hints["dataset"]))
    declared = getattr(cls, "DATASETS", None)
    if declared:
        return list(declared)
    default = next(f.default for f in dataclasses.fields(cls) if f.name == "dataset")
    return [str(default)]


def _check_dataset(cfg: EvalTaskConfig, formats_: dict[str, Any]) -> None:
    """A ValueError naming the valid datasets of the task (the built-in scenes included)."""
    if cfg.dataset not in formats_:
        valid = ["synthetic", *formats_]
        raise ValueError(
            f"unknown {cfg.task} dataset '{cfg.dataset}'{suggest(cfg.dataset, valid)}; "
            f"valid choices: {', '.join(valid)}"
        )


def load_task_data(cfg: EvalTaskConfig, image_size: int = 64) -> Any:
    """Load the dataset a task config names; raises a ValueError naming valid choices."""
    if (task := task_object(cfg.task)) is not None:  # every task object loads its own data
        return task.load(cfg, image_size)
    raise ValueError(
        f"unknown task '{cfg.task}'; valid choices: zeroshot, retrieval, segmentation, grouping, linear_probe"
    )


def load_retrieval_data(cfg: EvalTaskConfig, image_size: int = 64) -> Any:
    """Images and texts of a retrieval task: synthetic scenes, a dataset's files or FLAIR's."""
    if cfg.dataset == "synthetic":
        return _synthetic(cfg, image_size)
    path, root = _default_path(cfg), cfg.image_root
    _check_dataset(cfg, RETRIEVAL_FORMATS)
    if cfg.variant in FLAIR_VARIANTS:  # FLAIR's own evaluation files, as released
        data = load_flair_retrieval(cfg.dataset, path, root, cfg.variant, cfg.limit)
    else:
        data = RETRIEVAL_FORMATS[cfg.dataset](path, root, cfg)
    return formats.limit_retrieval(data, cfg.limit) if cfg.dataset != "sharegpt4v" else data


def load_classification_data(cfg: EvalTaskConfig, image_size: int = 64) -> Any:
    """Images and class names of a zero-shot classification task."""
    if cfg.dataset == "synthetic":
        return _synthetic(cfg, image_size)
    _check_dataset(cfg, CLASSIFICATION_FORMATS)
    return _classification(cfg, _default_path(cfg), cfg.image_root)


def load_segmentation_data(cfg: EvalTaskConfig, image_size: int = 64) -> Any:
    """Images, masks and class names of a zero-shot segmentation task."""
    if cfg.dataset == "synthetic":
        return _synthetic(cfg, image_size)
    _check_dataset(cfg, SEGMENTATION_FORMATS)
    load = {"voc": formats.load_voc, "coco_stuff": load_coco_stuff, "ade20k": load_ade20k}
    images, masks, names = load[cfg.dataset](_default_path(cfg), cfg.split)
    if cfg.classnames:
        names = load_classnames(cfg.classnames)
    return SegmentationData(_limit(images, cfg.limit), _limit(masks, cfg.limit), names)


# ---- linear-probe segmentation: a training and a measuring split ---------------------------
PROBE_TRAIN_SEED = 20_000  # the synthetic probe-training scenes; the test split uses the eval seed


@dataclass
class ProbeData:
    train: SegmentationData
    test: SegmentationData


def load_probe_data(cfg: EvalTaskConfig, image_size: int = 64) -> ProbeData:
    """The two splits of a ``LinearProbeTaskConfig``: generated scenes (``num_train`` from
    ``PROBE_TRAIN_SEED``, ``num_samples`` from the evaluation seeds; ``variant="color"`` labels objects by
    colour instead of shape) or a VOC-style folder's ``train_split`` / ``split`` lists."""

    def _seg(d: dict) -> SegmentationData:
        pre = "color_" if kind == "color" else ""  # objects labelled by colour, else by shape
        return SegmentationData(
            list(d["images"]), list(d[f"{pre}masks"]), list(d[f"{pre}classnames"])
        )

    kinds = SYNTHETIC_KINDS["segmentation"]
    kind = cfg.variant or kinds[0]
    if cfg.dataset == "synthetic" and kind not in kinds:
        raise ValueError(
            f"synthetic linear_probe variant '{kind}'{suggest(kind, list(kinds))}; "
            f"valid choices: {', '.join(kinds)}"
        )
    if cfg.dataset == "synthetic":
        train = synthetic_split("segmentation", cfg.num_train, seed=PROBE_TRAIN_SEED,
                                image_size=image_size)  # fmt: skip
        test = synthetic_split("segmentation", cfg.num_samples, image_size=image_size)
        return ProbeData(_seg(train), _seg(test))
    if not cfg.path:
        raise ValueError("linear_probe dataset=voc needs path= (a VOC-style folder)")
    splits = []
    for split in (cfg.train_split, cfg.split):
        images, masks, names = formats.load_voc(Path(cfg.path).expanduser(), split)
        splits.append(SegmentationData(_limit(images, cfg.limit), _limit(masks, cfg.limit), names))
    return ProbeData(*splits)
