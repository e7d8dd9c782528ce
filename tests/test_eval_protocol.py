"""The protocol card of every number: chance levels against brute force, the card's fields
from ``run_tasks``, and N / chance in the Markdown table and ``protocol.json``."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from finegrain.config import save_yaml
from finegrain.eval import run_tasks, write_report
from finegrain.eval.config import EvalTaskConfig
from finegrain.eval.protocol import classification_chance, retrieval_chance
from finegrain.eval.segmentation import chance_metrics, confusion, seg_metrics
from finegrain.eval_cli import main
from finegrain.run_config import RunConfig

from helpers.eval_toy import ToyConfig, ToyMethod, register_toy


def _brute_force_text_recall(n_images: int, owner: list[int], k: int) -> float:
    """Mean over images of P(one of its texts in the top k) over every ordering of the texts."""
    n_t = len(owner)
    hits = np.zeros(n_images)
    perms = list(itertools.permutations(range(n_t)))
    for p in perms:
        top = {owner[j] for j in p[:k]}
        for i in range(n_images):
            hits[i] += i in top
    return float((hits / len(perms)).mean())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_retrieval_chance_equals_enumeration(k):
    owner = [0, 0, 1, 2, 2, 2]  # 3 images with 2, 1 and 3 texts
    chance = retrieval_chance(3, owner, ks=(k,))
    assert chance[f"text_retrieval_recall@{k}"] == pytest.approx(
        _brute_force_text_recall(3, owner, k), abs=1e-12
    )
    assert chance[f"image_retrieval_recall@{k}"] == pytest.approx(min(k, 3) / 3)


def test_classification_chance():
    assert classification_chance(14) == pytest.approx(
        {"acc1": 1 / 14, "acc5": 5 / 14, "mean_per_class_recall": 1 / 14}
    )
    assert classification_chance(3)["acc5"] == 1.0


@pytest.mark.parametrize("ignore_background", [True, False])
def test_segmentation_chance_matches_random_labels(ignore_background):
    """The expected-confusion chance level against uniform random predictions on a large mask
    (law of large numbers: 400 x 400 pixels keep the sampled mIoU within 0.005 of it)."""
    rng = np.random.default_rng(0)
    mask = rng.choice(4, size=(400, 400), p=[0.5, 0.3, 0.15, 0.05])
    mask[:5, :5] = 255  # ignored pixels count nowhere
    n = 4
    k = n - 1 if ignore_background else n
    g = torch.Generator().manual_seed(1)
    pred = torch.randint(0, k, (400, 400), generator=g) + (1 if ignore_background else 0)
    conf = confusion(pred, torch.from_numpy(mask), n, ignore_background)
    sampled = seg_metrics(conf, ignore_background)
    exact = chance_metrics(conf, k, ignore_background)
    assert exact["miou"] == pytest.approx(sampled["miou"], abs=5e-3)
    assert exact["pixel_accuracy"] == pytest.approx(sampled["pixel_accuracy"], abs=5e-3)


def test_run_tasks_fills_a_card_per_task(tmp_path):
    tasks = [
        EvalTaskConfig(task="zeroshot", variant="shape", num_samples=8, templates="plain"),
        EvalTaskConfig(task="retrieval", variant="sentences", num_samples=6),
        EvalTaskConfig(task="segmentation", num_samples=4, templates="plain"),
    ]
    cards: dict = {}
    run_tasks(ToyMethod(), tasks, progress=False, protocols=cards, run_info={"step": 7, "seed": 3})
    zs = cards["zeroshot/synthetic/shape"]
    assert zs["n_images"] == 8 and zs["resolution"] == 32 and zs["step"] == 7 and zs["seed"] == 3
    assert zs["chance"]["acc1"] == pytest.approx(1 / zs["n_classes"])
    assert zs["settings"]["templates"] == "plain" and zs["path"] == "built-in"
    assert zs["truncation"].startswith("truncate to") or zs["truncation"] == "the method's own"
    rt = cards["retrieval/synthetic/sentences"]
    assert rt["n_images"] == 6 and rt["n_texts"] > 6
    assert rt["chance"]["image_retrieval_recall@1"] == pytest.approx(1 / 6)
    seg = cards["segmentation/synthetic"]
    assert 0 < seg["chance"]["miou"] < 1 and seg["n_images"] == 4
    md = write_report({"toy": {"zeroshot/synthetic/shape/acc1": 0.5}}, tmp_path, {"toy": cards})
    table = md["markdown"].read_text()
    chance = f"{100 * zs['chance']['acc1']:.2f}"
    assert f"| zeroshot/synthetic/shape | acc1 (%) | 8 | {chance} | 50.00 |" in table
    assert json.loads(md["protocol"].read_text())["toy"]["zeroshot/synthetic/shape"]["seed"] == 3


def test_eval_cli_writes_protocol_json_with_step_and_seed(tmp_path, capsys):
    register_toy()
    run = tmp_path / "run"
    (run / "ckpt" / "step_0000012").mkdir(parents=True)
    save_yaml(RunConfig(name="toy_a", seed=5, method=ToyConfig()), run / "config.yaml")
    weights = run / "ckpt" / "step_0000012" / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ToyMethod().state_dict().items()}, str(weights))
    out = tmp_path / "report"
    spec = "zeroshot:synthetic/shape@num_samples=8@templates=plain"
    assert main(["--checkpoint", str(weights), "--tasks", spec, "--out", str(out), "--quiet"]) == 0
    cards = json.loads((out / "protocol.json").read_text())
    card = cards["toy_a"]["zeroshot/synthetic/shape"]
    assert card["seed"] == 5 and card["n_images"] == 8 and card["step"] == 12
    assert card["checkpoint"] == str(weights) and card["weights"] == str(weights)
    assert "| N | chance |" in capsys.readouterr().out
    # a checkpoint dir resolves (once, at load) to its weights file; the card names that file
    ckpt = weights.parent
    assert main(["--checkpoint", str(ckpt), "--tasks", spec, "--out", str(out), "--quiet"]) == 0
    card = json.loads((tmp_path / "report-2" / "protocol.json").read_text())["toy_a"]
    card = card["zeroshot/synthetic/shape"]
    assert card["checkpoint"] == str(ckpt) and card["weights"] == str(weights)
    assert card["step"] == 12


def test_eval_help_lists_every_task_kind_its_datasets_and_options(capsys):
    from finegrain.eval.config import task_config_class
    from finegrain.eval.datasets import task_datasets
    from finegrain.registry import EVAL_TASK_CONFIGS

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for kind, _ in EVAL_TASK_CONFIGS.items():
        assert f"  {kind}: datasets {', '.join(task_datasets(kind))}" in text
    assert "dense_variant='raw'" in text and "num_groups=8" in text
    assert task_datasets("linear_probe") == ["synthetic", "voc"]  # from its Literal field
    assert task_config_class("retrieval") and "flickr8k" in task_datasets("retrieval")
