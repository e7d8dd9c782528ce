"""Declarative evaluation: a list of tasks run by ``finegrain eval`` and inside training."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalTaskConfig:
    task: str = "retrieval"  # zeroshot | retrieval | segmentation (see EVAL_TASKS)
    dataset: str = "synthetic"  # synthetic | flickr8k | coco | flickr30k | docci | iiw | dci | urban1k | sharegpt4v | imagefolder | voc | manifest | wds
    path: str = ""
    split: str = "test"
    variant: str = ""  # dataset-specific sub-split, e.g. synthetic: shape | color_shape | pattern_shape | novel
    num_samples: int = 256  # synthetic only
    batch_size: int = 64
    templates: str = "default"  # default (80 CLIP templates; synthetic: plain) | plain | a clip_benchmark set | file
    descriptions: str = ""  # '' | 'builtin' | path to {class: [descriptor, ...]} JSON
    scoring: str = "global"  # global | conditioned | rerank
    rerank_k: int = 20
    fusion_alpha: float = 1.0  # GRAIN: alpha * global + (1 - alpha) * region
    context_length: int = 0  # 0 = the model's
    background_threshold: float = 0.0
    background: str = ""  # segmentation: comma-separated background prompts (argmax -> label 0)
    image_size: int = (
        0  # dense tasks: inference resolution (0 = the model's; larger = more patches)
    )
    name: str = ""  # key prefix in results ('' = derived)
    # --- added by the evaluation suite ---
    image_root: str = ""  # images of an annotation file ('' = next to the annotation file)
    classnames: str = ""  # '' = the dataset's own | clip_benchmark dataset name | path (.txt/.json)
    limit: int = 0  # keep only the first N images of a real dataset (0 = all)
    memory_budget_mb: int = 1024  # text-conditioned scoring: max memory of one images x texts chunk
    num_examples: int = 4  # plots per task when an output folder is given


@dataclass
class EvalConfig:
    tasks: list[EvalTaskConfig] = field(default_factory=list)
