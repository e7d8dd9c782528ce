"""Declarative evaluation: a list of tasks run by ``finegrain eval`` and inside training.

One config class per task kind, polymorphic on ``task`` as ``MethodConfig`` is on ``name``:
``{"task": "zeroshot", ...}`` builds a ``ZeroShotTaskConfig``, and a key that kind does not
have is a one-line error naming the keys it has. Adding a kind = one dataclass deriving from
``EvalTaskConfig`` with ``task: Literal["<kind>"]``, decorated with ``@task_kind("<kind>")``,
plus its evaluate function in ``EVAL_TASKS`` (``finegrain.eval``). ``EvalTaskConfig(task=k,
...)`` is a factory: it builds the config class of kind ``k`` (default ``retrieval``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from finegrain.config import Checked, ConfigError
from finegrain.registry import EVAL_TASK_CONFIGS, suggest

T = TypeVar("T", bound=type)


def task_kind(name: str) -> Callable[[T], T]:
    """Register an ``EvalTaskConfig`` subclass as the config of task kind ``name``."""

    def deco(cls: T) -> T:
        EVAL_TASK_CONFIGS.add(name, cls)
        return cls

    return deco


@dataclass
class EvalTaskConfig(Checked):
    """Fields every task kind has; ``task`` selects the kind (see ``EVAL_TASK_CONFIGS``)."""

    __registry__ = EVAL_TASK_CONFIGS
    __discriminator__ = "task"

    def __new__(cls, *args: Any, **kwargs: Any) -> EvalTaskConfig:
        """``EvalTaskConfig(task="zeroshot", ...)`` builds the config class of that kind."""
        if cls is EvalTaskConfig:
            cls = task_config_class(kwargs.get("task", args[0] if args else "retrieval"))
            valid = [f.name for f in dataclasses.fields(cls)]
            unknown = [k for k in kwargs if k not in valid]
            if unknown:
                raise ConfigError(
                    f"unknown option '{unknown[0]}' for {cls.task} tasks"
                    f"{suggest(unknown[0], valid)}; valid: {', '.join(valid)}"
                )
        return super().__new__(cls)

    task: str = "retrieval"  # zeroshot | retrieval | segmentation (see EVAL_TASK_CONFIGS)
    dataset: str = "synthetic"  # per kind, see finegrain.eval.datasets (synthetic, flickr8k, ...)
    path: str = ""
    split: str = "test"
    variant: str = ""  # dataset-specific sub-split, e.g. synthetic: shape | color_shape | novel
    num_samples: int = 256  # synthetic only
    batch_size: int = 64
    context_length: int = 0  # text tokens; 0 = the model's
    name: str = ""  # key prefix in results ('' = derived)
    image_root: str = ""  # images of an annotation file ('' = next to the annotation file)
    limit: int = 0  # keep only the first N images of a real dataset (0 = all)
    num_examples: int = 4  # plots per task when an output folder is given


@task_kind("zeroshot")
@dataclass
class ZeroShotTaskConfig(EvalTaskConfig):
    """Zero-shot classification (``finegrain.eval.zeroshot``)."""

    task: Literal["zeroshot"] = "zeroshot"
    # default (80 CLIP templates; synthetic: plain) | plain | cupl | a clip_benchmark set | file
    templates: str = "default"
    descriptions: str = ""  # '' | 'builtin' | path to {class: [descriptor, ...]} JSON
    classnames: str = ""  # '' = the dataset's own | clip_benchmark dataset name | path (.txt/.json)
    scoring: Literal["global", "conditioned"] = "global"
    # descriptor prompts (finegrain.eval.templates): GRAIN's released code | Menon & Vondrick's
    # "{class}, which ..." | finegrain's earlier "{template} which has {d}"
    descriptor_prompts: Literal["released", "menon_vondrick", "which_has"] = "released"
    # class vector: "auto" = the plain mean of normalised prompt embeddings with descriptions or
    # for methods whose released eval does not renormalise (GRAIN), else renormalised (CLIP)
    class_vectors: Literal["auto", "mean", "renormalized"] = "auto"
    fusion_alpha: float = 1.0  # GRAIN: alpha * global + (1 - alpha) * region
    # region score of a class: "released" = mean over region queries of the max over the
    # class's raw descriptors; "max_query" = max over region queries of <r_q, class vector>
    region_score: Literal["released", "max_query"] = "released"
    # a class the descriptions lack: scored by its name alone and counted, or a one-line error
    missing_descriptions: Literal["name_only", "error"] = "name_only"
    memory_budget_mb: int = 1024  # text-conditioned scoring: max memory of one chunk
    # texts past the context: "model" cuts them at context_length (0 = the tower's); "stretch"
    # stretches the text tower's positions to context_length (0 = Long-CLIP's 4x) without
    # training (finegrain.eval.long_text); the count of cut texts goes into the protocol
    truncate: Literal["model", "stretch"] = "model"
    stretch_mode: Literal["longclip", "linear"] = "longclip"
    stretch_keep: int = 20  # longclip: first positions kept as they are


@task_kind("retrieval")
@dataclass
class RetrievalTaskConfig(EvalTaskConfig):
    """Image-text retrieval, global, text-conditioned or re-ranked (``finegrain.eval.retrieval``)."""

    task: Literal["retrieval"] = "retrieval"
    scoring: Literal["global", "conditioned", "rerank"] = "global"
    rerank_k: int = 20
    memory_budget_mb: int = 1024  # text-conditioned scoring: max memory of one images x texts chunk
    # texts past the context: "model" cuts them at context_length (0 = the tower's); "stretch"
    # stretches the text tower's positions to context_length (0 = Long-CLIP's 4x) without
    # training (finegrain.eval.long_text); the count of cut texts goes into the protocol
    truncate: Literal["model", "stretch"] = "model"
    stretch_mode: Literal["longclip", "linear"] = "longclip"
    stretch_keep: int = 20  # longclip: first positions kept as they are


@task_kind("segmentation")
@dataclass
class SegmentationTaskConfig(EvalTaskConfig):
    """Zero-shot semantic segmentation from patch-text similarity (``finegrain.eval.segmentation``)."""

    task: Literal["segmentation"] = "segmentation"
    templates: str = "default"
    classnames: str = ""  # '' = the dataset's own | clip_benchmark dataset name | path (.txt/.json)
    background_threshold: float = 0.0  # > 0: predict background where the best similarity is lower
    background: str = ""  # comma-separated background prompts; their argmax is background (CLIPpy)
    image_size: int = 0  # inference resolution (0 = the model's; larger = more patches)
    # last-block variant of the image tower (finegrain.encoders.dense): raw | maskclip | sclip |
    # naclip; dense_block: "released" = each reference's code, or attention_only / residual_ffn
    dense_variant: Literal["raw", "maskclip", "sclip", "naclip"] = "raw"
    dense_block: Literal["released", "attention_only", "residual_ffn"] = "released"
    gaussian_std: float = 5.0  # naclip neighbourhood window (NACLIP's released default)
    # sliding windows: resize the short side to slide_size (0 = whole image squashed to the
    # model size), windows of the model's input size every slide_stride pixels, logits averaged
    slide_size: int = 0
    slide_stride: int = 0  # 0 = half the window (SCLIP/NACLIP: 112 for 224-pixel windows)


@task_kind("grouping")
@dataclass
class GroupingTaskConfig(EvalTaskConfig):
    """Bottom-up grouping from patch features, no text (``finegrain.eval.grouping``);
    datasets: synthetic (instance masks of the built-in scenes) | voc (SegmentationObject)."""

    task: Literal["grouping"] = "grouping"
    image_size: int = 0  # inference resolution (0 = the model's; larger = more patches)
    num_groups: int = 8  # k principal directions as centres (CLIPpy: 8)
    center: bool = False  # True: centred PCA (covariance) instead of the uncentred SVD


@task_kind("linear_probe")
@dataclass
class LinearProbeTaskConfig(EvalTaskConfig):
    """Linear-probe segmentation on frozen dense features (``finegrain.eval.linear_probe``): a
    1x1-conv head trained on ``train_split`` (synthetic: ``num_train`` generated scenes), mIoU on
    ``split`` (synthetic: ``num_samples`` scenes of the evaluation seeds)."""

    task: Literal["linear_probe"] = "linear_probe"
    dataset: Literal["synthetic", "voc"] = "synthetic"
    train_split: str = "train"
    split: str = "val"
    num_train: int = 256
    batch_size: int = 32
    epochs: int = 30
    lr: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0


@task_kind("region")
@dataclass
class RegionTaskConfig(EvalTaskConfig):
    """Classification of ground-truth boxes (``finegrain.eval.regions``); datasets: synthetic
    (variant shape | color), coco | lvis (``path`` = the instance JSON or a folder as released,
    ``annotations/instances_<split>2017.json``; ``image_root``)."""

    task: Literal["region"] = "region"
    dataset: Literal["synthetic", "coco", "lvis"] = "synthetic"
    # coco / lvis folder with several instance files: the one of this split (val -> val2017)
    split: str = "val"
    # crop: encode the cropped box | roialign: pool dense_features | regions: region embeddings
    mode: Literal["crop", "roialign", "regions"] = "crop"
    margin: float = 0.0  # context on each side of a box, as a fraction of its width/height
    square: bool = True  # crop: pad the box to a square (mean colour) instead of squashing it
    roi_size: int = 7  # roialign: output bins per side, averaged
    sampling_ratio: int = 0  # roialign: samples per bin side (0 = adaptive, torchvision's)
    region_scoring: Literal["iou", "released"] = "iou"  # regions: see finegrain.eval.regions
    image_size: int = 0  # roialign/regions: inference resolution (0 = the model's)
    feature_cache_mb: int = 1024  # roialign: dense maps kept for later tasks of one eval run
    templates: str = "default"
    descriptions: str = ""  # '' | 'builtin' | path to {class: [descriptor, ...]} JSON
    classnames: str = ""  # '' = the dataset's own | clip_benchmark dataset name | path
    descriptor_prompts: Literal["released", "menon_vondrick", "which_has"] = "released"
    class_vectors: Literal["auto", "mean", "renormalized"] = "auto"


def task_config_class(task: str) -> type[EvalTaskConfig]:
    """The config class of task kind ``task``; a ``ValueError`` naming the kinds otherwise."""
    return EVAL_TASK_CONFIGS.get(task)


@dataclass
class EvalConfig(Checked):
    tasks: list[EvalTaskConfig] = field(default_factory=list)


@task_kind("hardneg")
@dataclass
class HardNegTaskConfig(EvalTaskConfig):
    """Attribute hard negatives, FG-OVD style (``finegrain.eval.hardneg``): each box's true
    description vs N with attributes changed; top-1 overall, by difficulty and by attribute.
    Datasets: synthetic (variant regions | single), fgovd (FG-OVD benchmark JSON), jsonl."""

    task: Literal["hardneg"] = "hardneg"
    dataset: Literal["synthetic", "fgovd", "jsonl"] = "synthetic"
    # what the model sees of a box: auto = the whole image when the data has one object per
    # image, else crop; crop = the box plus margin, squashed to the input size; image = whole;
    # roialign = the box RoIAlign-pooled from the whole image's dense_features (global scoring)
    region: Literal["auto", "crop", "image", "roialign"] = "auto"
    crop_margin: float = 0.1  # crop/roialign: grow the box by this fraction of its size per side
    roi_size: int = 7  # roialign: output bins per side, averaged
    # first N negatives per box, boxes with fewer skipped; 0 = all; -1 = the data's protocol:
    # FG-OVD files 10, pattern 7, transparency 2 (its ranks.py / run_all_ranks.py), else all
    num_negatives: int = -1
    scoring: Literal["global", "conditioned"] = "global"
    memory_budget_mb: int = 1024  # text-conditioned scoring: max memory of one chunk


@task_kind("compositional")
@dataclass
class CompositionalTaskConfig(EvalTaskConfig):
    """Compositionality (``finegrain.eval.compositional``): an image's caption vs negatives that
    swap or replace attributes, objects or relations (SugarCrepe), accuracy per kind; and
    Winoground-style 2x2 groups (text, image, group score). Datasets: synthetic (variant pairs |
    winoground), sugarcrepe (folder of <kind>.json + COCO images), winoground (jsonl + images)."""

    task: Literal["compositional"] = "compositional"
    dataset: Literal["synthetic", "sugarcrepe", "winoground"] = "synthetic"
    scoring: Literal["global", "conditioned"] = "global"
    memory_budget_mb: int = 1024  # text-conditioned scoring: max memory of one chunk
