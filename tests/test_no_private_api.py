"""No private (underscore) API of a dependency is used in finegrain/: such names change between
releases without notice (transformers 5.25 changed ``BertModel._create_attention_masks`` and broke
every Hugging Face text tower). Reads the code's syntax tree, so docstrings and comments that
name a private API do not count, and ``obj._x``, ``getattr(obj, "_x")`` and
``hasattr(obj, "_x")`` all do.

Allowed: ``self._x`` / ``cls._x`` / ``super()._x`` (our own classes, and nn.Module's overridable
hooks), names bound to finegrain's own modules, our own attributes set on foreign objects
(``_fg_*``), and the entries of ALLOWED, each with the reason it is not a dependency's private
API or cannot be done otherwise."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finegrain"

# efficientnet_lite_pytorch (unmaintained, 0.1.0) names every part of its network with a leading
# underscore; these names are its checkpoint format (state-dict keys ``_blocks.0._bn1.weight``),
# it has no other names for them.
EFFICIENTNET_PARTS = {"_blocks", "_conv_stem", "_bn0", "_bn1", "_bn2", "_conv_head", "_fc",
                      "_swish", "_expand_conv", "_depthwise_conv", "_project_conv",
                      "_global_params", "_block_args"}  # fmt: skip
ALLOWED: dict[str, set[str]] = {
    "encoders/efficientnet.py": EFFICIENTNET_PARTS,
    "encoders/hybrid.py": EFFICIENTNET_PARTS,  # its frozen bottom is the efficientnet-lite net
    "encoders/conv_fused.py": EFFICIENTNET_PARTS
    | {
        # Tensor._version: autograd's in-place counter, the only way to see that a weight was
        # changed in place (optimizer step, load_state_dict) and the folded-BN cache is stale
        "_version",
        # oneDNN's fused conv op (what torch.compile emits on CPU): probed once against
        # F.conv2d, any failure or difference selects the public F.conv2d path
        "_convolution_pointwise",
    },
}


# documented public API despite the underscore (the standard library's, not a dependency's)
PUBLIC = {"os._exit"}


def _own_module_names(tree: ast.Module) -> set[str]:
    """Names bound to finegrain modules by imports (``from finegrain.train import guard``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("finegrain"):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names
                      if a.name.startswith("finegrain")}  # fmt: skip
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("_fg_") and not name.endswith("__")


def _ours(value: ast.expr, own: set[str]) -> bool:
    if isinstance(value, ast.Name):
        return value.id in {"self", "cls"} | own
    return (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
            and value.func.id == "super")  # fmt: skip


def private_uses(source: str) -> list[tuple[int, str]]:
    """(line, code) of every private attribute of a foreign object in ``source``."""
    tree = ast.parse(source)
    own = _own_module_names(tree)
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr)
                and not _ours(node.value, own) and ast.unparse(node) not in PUBLIC):  # fmt: skip
            found.append((node.lineno, node.attr, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in {"getattr", "hasattr", "setattr", "delattr"}
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _private(node.args[1].value)
              and not _ours(node.args[0], own)):  # fmt: skip
            found.append((node.lineno, node.args[1].value, ast.unparse(node)))
    return [(line, f"{attr}: {code}") for line, attr, code in sorted(found)]


def test_no_private_dependency_api_in_finegrain():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        allowed = ALLOWED.get(rel, set())
        for line, what in private_uses(path.read_text()):
            if what.split(":")[0] not in allowed:
                bad.append(f"finegrain/{rel}:{line}: {what.split(': ', 1)[1]}")
    assert not bad, "private API of a dependency (use its public API):\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "code",
    [
        "import torch\nok = torch._foreach_norm(xs)",
        "h = model._create_attention_masks(attention_mask=m)",
        "x = m._pos_embed(x)",
        "f = getattr(model, '_create_attention_masks')",
        "ok = hasattr(model, '_pos_embed')",
        "import torch.nn.functional as F\ny = F._canonical_mask(m)",
        "y = torch._C._nn.gelu(x)",
    ],
)
def test_the_check_catches_private_uses(code):
    assert private_uses(code), code


@pytest.mark.parametrize(
    "code",
    [
        "class A:\n    def f(self):\n        return self._x + cls._y",
        "class A(B):\n    def f(self, *a):\n        super()._load_from_state_dict(*a)",
        "from finegrain.train import checkpoint as ckpt\nckpt._latest(d)",
        "import finegrain.encoders.vit as vit\nvit._split(x)",
        "conv.__dict__['_fg_folded'] = 1\nc = getattr(conv, '_fg_folded', None)",
        "x = obj.__class__.__name__",
        "import os\nos._exit(3)",
        '"""docstring naming model._create_attention_masks"""\n# m._pos_embed in a comment',
    ],
)
def test_the_check_allows_our_own(code):
    assert not private_uses(code), private_uses(code)
