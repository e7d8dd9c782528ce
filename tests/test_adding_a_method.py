"""docs/ADDING_A_METHOD.md followed once: a toy method built by its checklist trains through the
real trainer, evaluates, reports its capabilities and loads a checkpoint with a renamed key;
every file and name the page points to exists."""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finegrain.data.collate import ContrastiveCollate
from finegrain.encoders.base import build_image_tower, build_text_tower
from finegrain.eval import run_tasks
from finegrain.eval.config import EvalTaskConfig
from finegrain.heads.projection import Projection
from finegrain.methods.base import Method, MethodConfig, build_method
from finegrain.methods.objectives import ClipObjective, Objectives
from finegrain.methods.vocab import l2
from finegrain.recipes.base import get_recipe
from finegrain.registry import METHODS
from finegrain.train.trainer import Trainer

DOC = Path(__file__).parents[1] / "docs" / "ADDING_A_METHOD.md"
NAME = "doc_toy_method"


@dataclass
class DocToyConfig(MethodConfig):  # step 1
    name: str = NAME
    embed_dim: int = 32


class DocToy(Method):  # step 2
    Config = DocToyConfig
    key_renames = (("img_proj.", "image_proj."),)  # step 5: a renamed parameter

    def __init__(self, cfg: DocToyConfig) -> None:
        super().__init__(cfg)
        self.image = build_image_tower(cfg.image)
        self.text = build_text_tower(cfg.text)
        self.image_proj = Projection(self.image.width, cfg.embed_dim)
        self.text_proj = Projection(self.text.width, cfg.embed_dim)
        self.make_temperature()
        self.objectives = Objectives([(ClipObjective(), {"clip_loss": 1.0})])

    def make_collate(self, train: bool = True) -> ContrastiveCollate:  # step 3
        return ContrastiveCollate(self.text.tokenizer, 1, train=train)

    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"image": self.encode_image(batch["image"]), "text": self.encode_text(batch["text"])}

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.image_proj(self.image(images).pooled)
        return l2(x) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text_proj(self.text(tokens).pooled)
        return l2(x) if normalize else x

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:  # step 4
        out = self.image(images)
        return out.token_map(self.image_proj(out.tokens))


if NAME not in METHODS:
    METHODS.register(NAME)(DocToy)


def _run() -> Any:
    cfg = get_recipe("clip_smoke")  # step 6: a smoke run (tiny towers, synthetic scenes)
    m = cfg.method
    cfg.method = DocToyConfig(image=m.image, text=m.text)
    cfg.train = dataclasses.replace(cfg.train, steps=2, checkpoint_every=0, progress=False)
    return cfg


def test_the_checklist_gives_a_method_that_trains_and_evaluates(tmp_path: Path) -> None:
    cfg = _run()
    summary = Trainer(cfg, output_dir=str(tmp_path)).fit()
    assert summary and (tmp_path / "config.yaml").is_file()
    torch.manual_seed(0)
    method = build_method(cfg.method)
    assert method.capabilities() == {"dense_features"}
    tasks = [EvalTaskConfig(task="segmentation", dataset="synthetic", num_samples=4)]
    res = run_tasks(method, tasks, progress=False, data_cfg=cfg.data)
    assert any(k.endswith("miou") for k in res), res


def test_a_renamed_key_loads() -> None:
    method = build_method(_run().method)
    old = {("img_proj." + k[len("image_proj.") :] if k.startswith("image_proj.") else k): v
           for k, v in method.state_dict().items()}  # fmt: skip
    fresh = build_method(_run().method)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.image_proj.weight, method.image_proj.weight)


def test_the_page_points_to_what_exists() -> None:
    text = DOC.read_text()
    root = Path(__file__).parents[1]
    for path in re.findall(r"`(finegrain/[\w/.]+|tests/[\w/.]+)`", text):
        assert (root / path).exists(), path
    names = {"Method", "MethodConfig", "make_temperature", "Objectives", "Objective",
             "key_renames", "migrate_state_dict", "capabilities", "in_default_benchmark",
             "supports_feature_cache", "token_map", "l2", "LOSS_TERMS"}  # fmt: skip
    where = [importlib.import_module(m) for m in ("finegrain.methods.base",
             "finegrain.methods.objectives", "finegrain.methods.vocab", "finegrain.outputs")]  # fmt: skip
    for name in names:
        assert f"`{name}" in text or f"{name}(" in text or f".{name}" in text, name
        assert any(hasattr(m, name) or hasattr(m.__dict__.get("Method", object), name)
                   or hasattr(getattr(m, "VisionOutput", object), name) for m in where), name  # fmt: skip
