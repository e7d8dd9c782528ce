"""docs/ADDING_A_TASK.md followed once: a toy task written as its checklist says (one file's
worth: config, ``EvalTask``, ``register_task``) runs through ``run_tasks`` with its own data,
metric, name modifier, per-image values and plots; task files in ``finegrain/eval/tasks/`` are
found; every file and name the page points to exists."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import finegrain.eval as ev
import finegrain.eval.tasks
from finegrain.bench.tasks import per_image_values
from finegrain.config import ConfigError
from finegrain.eval import EvalTask, register_task, run_tasks
from finegrain.eval.common import encode_images, encode_texts
from finegrain.eval.config import EvalTaskConfig
from finegrain.eval.datasets import load_task_data
from finegrain.methods.base import build_method
from finegrain.recipes.base import get_recipe
from finegrain.registry import EVAL_TASKS

DOC = Path(__file__).parents[1] / "docs" / "ADDING_A_TASK.md"
NAME = "doc_toy_match"


@dataclass
class ToyMatchConfig(EvalTaskConfig):
    task: str = NAME
    num_samples: int = 8
    offset: int = 1  # the negative caption is that of image (i + offset) mod N


class ToyMatch(EvalTask):
    """Does each image score its own caption above one other image's caption? chance 1/2."""

    name, Config = NAME, ToyMatchConfig

    def load(self, cfg: ToyMatchConfig, image_size: int) -> Any:
        return load_task_data(EvalTaskConfig(task="retrieval", dataset=cfg.dataset,
                                             num_samples=cfg.num_samples), image_size)  # fmt: skip

    def evaluate(self, ctx: Any, cfg: ToyMatchConfig, data: Any) -> tuple[dict, dict]:
        m = ctx.method
        first = [data.text_to_image.index(i) for i in range(len(data.images))]
        img = encode_images(ctx, data.images, m.encode_image, cfg.batch_size).double()
        txt = encode_texts(ctx, [data.texts[j] for j in first], m.encode_text, cfg.batch_size)
        sims = img @ txt.double().t()  # (N, N)
        n = len(data.images)
        other = (torch.arange(n) + cfg.offset) % n
        won = (sims.diagonal() > sims[torch.arange(n), other]).double()
        return {"acc": won.mean().item(), "chance": 0.5}, {"won": won.tolist()}

    def modifiers(self, cfg: ToyMatchConfig) -> list[str]:
        return [f"offset{cfg.offset}"] if cfg.offset != 1 else []

    def per_image_values(self, data: Any, art: dict, metrics: dict) -> dict[str, Any]:
        won = torch.tensor(art["won"], dtype=torch.float64)
        return {"acc": (won, torch.arange(len(won)))}  # (value, image of each value)

    def plots(self, ctx: Any, data: Any, art: dict, out_dir: Path, num: int) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "won.txt"
        path.write_text(" ".join(str(int(w)) for w in art["won"][:num]))
        return [path]


if NAME not in EVAL_TASKS.names():
    register_task(ToyMatch())


def test_the_checklist_gives_a_task_that_runs(tmp_path: Path) -> None:
    cfg = get_recipe("clip_smoke")
    torch.manual_seed(0)
    method = build_method(cfg.method)
    tasks = [EvalTaskConfig(task=NAME, num_samples=6, num_examples=6),
             EvalTaskConfig(task=NAME, offset=2, num_examples=0)]  # fmt: skip
    res = run_tasks(method, tasks, progress=False, data_cfg=cfg.data, out_dir=tmp_path)
    assert 0 <= res[f"{NAME}/synthetic/acc"] <= 1 and res[f"{NAME}/synthetic/chance"] == 0.5
    assert f"{NAME}/synthetic/offset2/acc" in res  # the task's own name modifier
    won = (tmp_path / NAME / "synthetic" / "won.txt").read_text().split()
    assert len(won) == 6 and set(won) <= {"0", "1"}  # its own plots
    # the metric against a naive per-image loop in float64
    task = EVAL_TASKS.get(NAME)
    data = task.load(EvalTaskConfig(task=NAME, num_samples=6), 64)
    with torch.no_grad():
        ims = [method.encode_image(x[None]).double()[0] for x in _tensors(data, cfg)]
        caps = method.encode_text(method.tokenize([data.texts[data.text_to_image.index(i)]
                                                   for i in range(6)])).double()  # fmt: skip
    naive = [float(ims[i] @ caps[i] > ims[i] @ caps[(i + 1) % 6]) for i in range(6)]
    assert [int(w) for w in won] == naive and res[f"{NAME}/synthetic/acc"] == sum(naive) / 6
    values, owner = per_image_values(NAME, data, {"won": naive}, {})["acc"]  # the benchmark's
    assert values.tolist() == naive and owner.tolist() == list(range(6))


def _tensors(data: Any, cfg: Any) -> list[torch.Tensor]:
    from finegrain.eval.common import eval_transform
    from finegrain.eval.containers import load_image

    tf = eval_transform(64, cfg.data.mean, cfg.data.std)
    return [tf(load_image(im)) for im in data.images]


def test_a_bad_option_is_one_line() -> None:
    with pytest.raises(ConfigError, match=f"unknown option 'ofset' for {NAME} tasks"):
        EvalTaskConfig(task=NAME, ofset=2)
    with pytest.raises(ValueError, match="a Config subclass whose task defaults to it"):
        register_task(type("Bad", (EvalTask,), {"name": "bad_task"})())


def test_task_files_are_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file dropped in finegrain/eval/tasks/ registers its task (here: a temporary folder
    added to the package path)."""
    (tmp_path / "doc_dropped.py").write_text(
        "from dataclasses import dataclass\n"
        "from finegrain.eval.config import EvalTaskConfig\n"
        "from finegrain.eval.task import EvalTask, register_task\n"
        "@dataclass\nclass C(EvalTaskConfig):\n    task: str = 'doc_dropped'\n"
        "class T(EvalTask):\n    name, Config = 'doc_dropped', C\n"
        "register_task(T())\n"
    )
    monkeypatch.setattr(finegrain.eval.tasks, "__path__", [*finegrain.eval.tasks.__path__,
                                                           str(tmp_path)])  # fmt: skip
    monkeypatch.delitem(sys.modules, "finegrain.eval.tasks.doc_dropped", raising=False)
    if "doc_dropped" not in EVAL_TASKS.names():
        assert "finegrain.eval.tasks.doc_dropped" in ev.import_task_modules()
    assert isinstance(EVAL_TASKS.get("doc_dropped"), EvalTask)


def test_the_page_points_to_what_exists() -> None:
    text = DOC.read_text()
    root = Path(__file__).parents[1]
    for path in re.findall(r"`(finegrain/[\w/.]+?/?|tests/[\w/.]+)`", text):
        if "<name>" not in path:
            assert (root / path).exists(), path
    for name in ("EvalTask", "register_task", "run_tasks", "task_prefix"):
        assert name in text and hasattr(ev, name), name
    for name in ("load", "evaluate", "modifiers", "leading_modifiers", "per_image_values", "plots"):
        assert f"`{name}(" in text and hasattr(EvalTask, name), name
