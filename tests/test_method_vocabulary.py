"""The one vocabulary of method files (``finegrain.methods.vocab``, issue #28 item 1).

Every method names its towers ``image``/``text``, its features and loss terms from the
vocabulary (checked per method in ``test_method_contract.py``); the method files spell L2
normalisation, tokenisation, the logit scale and the token map once (checked here on their
source); checkpoints written before a rename still load (GRAIN's ``visual.`` -> ``image.``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from finegrain.checkpoint import load_run
from finegrain.methods.base import build_method
from finegrain.methods.vocab import l2, rename_prefixes
from finegrain.recipes.base import get_recipe

from helpers.interop import make_run

METHOD_FILES = sorted(
    p for p in (Path(__file__).parents[1] / "finegrain" / "methods").glob("*.py")
    if p.name not in ("__init__.py", "base.py", "vocab.py")
)  # fmt: skip


def _calls(tree: ast.AST) -> list[str]:
    """Dotted names of every call in ``tree`` (``F.normalize``, ``LogitScale``, ...)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            out.append(ast.unparse(node.func))
    return out


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: p.name)
def test_method_files_use_the_shared_helpers(path: Path) -> None:
    tree = ast.parse(path.read_text())
    calls = _calls(tree)
    defs = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert not [c for c in calls if c.endswith("normalize")], "L2: use vocab.l2"
    assert "LogitScale" not in calls, "the logit scale: Method.make_temperature"
    assert not {"_l2", "tokenize", "normalize"} & defs, "one tokenize (base), one l2 (vocab)"
    # a hand-made (B, N, D) -> (B, D, h, w) reshape: VisionOutput.token_map instead
    src = path.read_text()
    assert ".transpose(1, 2).reshape(" not in src, "use VisionOutput.token_map"
    assert "visual" not in {a.attr for a in ast.walk(tree) if isinstance(a, ast.Attribute)}


def test_l2_and_prefix_renames() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    assert torch.equal(l2(x), torch.tensor([[0.6, 0.8], [0.0, 1.0]], dtype=torch.float64))
    got = rename_prefixes({"visual.a": 1, "text.visual.b": 2, "c": 3}, [("visual.", "image.")])
    assert list(got.items()) == [("image.a", 1), ("text.visual.b", 2), ("c", 3)]


def _old_grain_state() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    sd = {
        k: v.clone() for k, v in build_method(get_recipe("grain_smoke").method).state_dict().items()
    }
    old = {("visual." + k[len("image.") :] if k.startswith("image.") else k): v
           for k, v in sd.items()}  # fmt: skip
    assert any(k.startswith("visual.") for k in old) and not any(
        k.startswith("image.") for k in old
    )
    return sd, old


def test_grain_checkpoint_with_the_old_tower_name_loads() -> None:
    """``load_state_dict`` of a state dict whose image tower is ``visual.`` (before the
    vocabulary) gives the same tensors; fails with ``key_renames`` emptied."""
    sd, old = _old_grain_state()
    fresh = build_method(get_recipe("grain_smoke").method)
    fresh.load_state_dict(old)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in sd.items())


def test_load_run_migrates_old_keys(tmp_path: Path) -> None:
    """The loaders check keys before ``load_state_dict``: ``load_run`` migrates first."""
    run = make_run(tmp_path / "run", "grain_smoke")
    _, old = _old_grain_state()
    (run / "old").mkdir()
    save_file({k: v.contiguous() for k, v in old.items()}, run / "old" / "model.safetensors")
    own = load_run(run / "old" / "model.safetensors").method.state_dict()
    assert len(own) == len(old)
    for key, value in own.items():
        before = "visual." + key[len("image.") :] if key.startswith("image.") else key
        assert torch.equal(value, old[before]), key
