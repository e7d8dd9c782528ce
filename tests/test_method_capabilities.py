"""The declared method contract (issue #28 item 2): every part of a method that evaluation,
the benchmark, interop and the API use is declared on ``Method``; ``Method.capabilities()``
is the one place that says what a method can do; nothing outside ``finegrain/methods/``
probes a method's attributes (``getattr`` / ``hasattr`` / ``type(m).hook is Method.hook``).
"""

from __future__ import annotations

import ast
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from finegrain.bench.tasks import NEEDS, capability
from finegrain.eval.common import require
from finegrain.methods.base import CAPABILITIES, OPTIONAL_HOOKS, Method, build_method
from finegrain.recipes.base import get_recipe

ROOT = Path(__file__).parents[1] / "finegrain"
# names of method parts: a getattr/hasattr with one of these is attribute probing
PARTS = {*OPTIONAL_HOOKS, "teacher", "dense_tower", "zeroshot_class_vectors", "visual",
         "supports_feature_cache", "probe_features", "image_proj", "text_proj", "eval_model",
         "has_regions", "has_conditioned_score", "frozen_parameter_ids"}  # fmt: skip
METHOD_EXPR = re.compile(r"(^|\.)method$")  # how the code names a method object
SHORT = re.compile(r"^m$")  # eval's ``m = ctx.method``; below methods/ ``m`` is a model
BELOW = ("encoders", "heads", "losses")


def probes(path: Path, below: bool = False) -> list[str]:
    """``line: code`` of every attribute probe of a method in ``path`` (``below``: a package
    below methods/, where ``m`` names a model, not a method)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        bad = False
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "hasattr"):
            obj, name = node.args[0], node.args[1] if len(node.args) > 1 else None
            text = name.value if isinstance(name, ast.Constant) else None
            expr = ast.unparse(obj)
            bad = bool(METHOD_EXPR.search(expr)) or text in PARTS
            bad = bad or (not below and bool(SHORT.search(expr)))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            bad = node.value.id == "Method" and node.attr in OPTIONAL_HOOKS
        if bad:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_attribute_probing_of_methods_outside_methods() -> None:
    files = [p for p in ROOT.rglob("*.py") if "methods" not in p.relative_to(ROOT).parts]
    found = [
        f"{p.relative_to(ROOT.parent)}:{hit}"
        for p in sorted(files)
        for hit in probes(p, below=p.relative_to(ROOT).parts[0] in BELOW)
    ]
    assert not found, "declare the part on Method instead:\n" + "\n".join(found)


def test_the_probe_finder_finds_probes(tmp_path: Path) -> None:
    """The checker itself: each spelling of a probe is found, a declared call is not."""
    src = tmp_path / "x.py"
    src.write_text("a = getattr(ctx.method, 'x', None)\nb = hasattr(tower, 'predict_boxes')\n"
                   "c = type(m).dense_features is Method.dense_features\nd = method.towers()\n")  # fmt: skip
    hits = probes(src)
    assert [h.split(":")[0] for h in hits] == ["1", "2", "3"], hits


EXPECTED = {
    "clip": {"dense_features", "feature_cache"},
    "siglip": {"dense_features", "feature_cache"},
    "clippy": {"dense_features", "feature_cache"},
    "flair": {"score_features", "dense_features", "attention_maps"},
    "grain": {"dense_features", "region_embeddings", "predict_boxes"},
    "detailclip": {"dense_features"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_capabilities_of_the_six_methods(name: str) -> None:
    method = build_method(get_recipe(f"{name}_smoke").method)
    caps = method.capabilities()
    assert caps == EXPECTED[name] and caps <= set(CAPABILITIES)
    for needs, hook in NEEDS.items():  # the benchmark reads the same declaration
        assert capability(method, needs) == (hook in caps)
    for hook in set(OPTIONAL_HOOKS) - caps:  # evaluation too
        with pytest.raises(ValueError, match=f"has no {hook}, which task 't' needs"):
            require(method, hook, "t")
    assert method.has_regions == ("region_embeddings" in caps)
    assert set(method.towers()) == {"image", "text", "image_proj", "text_proj"}


def test_detailclip_evaluates_through_its_teacher_when_asked() -> None:
    cfg = get_recipe("detailclip_smoke").method
    student = build_method(cfg)
    assert student.eval_towers()["image"] is student.image
    teacher = build_method(replace(cfg, eval_model="teacher"))
    towers = teacher.eval_towers()
    assert towers["image"] is teacher.teacher["image"] and towers["text"] is teacher.teacher["text"]
    restore = teacher.replace_text_towers(lambda t: torch.nn.Identity())
    assert isinstance(teacher.text, torch.nn.Identity)
    assert isinstance(teacher.teacher["text"], torch.nn.Identity)
    restore()
    assert teacher.eval_towers()["text"] is towers["text"]
    assert not isinstance(teacher.text, torch.nn.Identity)


def test_a_new_hook_is_a_capability() -> None:
    """A method implementing an optional hook has it as a capability, with no other change."""

    class Boxes(Method):
        def predict_boxes(self, images: torch.Tensor) -> torch.Tensor:
            return torch.zeros(images.shape[0], 1, 4)

    method = Boxes(get_recipe("clip_smoke").method)
    assert method.capabilities() == {"predict_boxes"} and capability(method, "boxes")
