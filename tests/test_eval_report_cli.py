"""Reports (JSON + Markdown), task-spec parsing, ``finegrain eval`` end to end on a saved toy
checkpoint, and the built-in synthetic splits through the adapter."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file
from test_eval_retrieval import write_manifest
from test_eval_zeroshot import write_imagefolder

from finegrain.config import save_yaml
from finegrain.eval import run_tasks, write_report
from finegrain.eval.config import EvalTaskConfig
from finegrain.eval.report import markdown_table
from finegrain.eval_cli import main, parse_task

from helpers.eval_toy import ConditionedToy, ToyConfig, ToyMethod, register_toy


def test_write_report_json_and_markdown(tmp_path):
    a = {"retrieval/x/image_retrieval_recall@1": 0.5, "retrieval/x/image_retrieval_mean_rank": 3.25}
    b = {"retrieval/x/image_retrieval_recall@1": 0.75, "zeroshot/y/acc1": 0.125}
    paths = write_report({"clip": a, "flair": b}, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data == {"clip": a, "flair": b}
    md = paths["markdown"].read_text()
    assert "| task | metric | clip | flair |" in md
    assert "| retrieval/x | image_retrieval_recall@1 (%) | 50.00 | 75.00 |" in md
    assert "| retrieval/x | image_retrieval_mean_rank | 3.25 | - |" in md
    assert "| zeroshot/y | acc1 (%) | - | 12.50 |" in md
    assert "| model |" in markdown_table(a)
    # N: images / the pairs of the metric's kind (SugarCrepe), all pairs for the mean
    card = {"task": "compositional", "n_images": 3, "n_pairs": 4, "chance": {},
            "n_pairs_per_kind": {"swap_att": 3, "replace_rel": 1}}  # fmt: skip
    c = {"compositional/s/acc_swap_att": 0.5, "compositional/s/acc_replace_rel": 1.0,
         "compositional/s/acc": 0.75}  # fmt: skip
    md = markdown_table(c, {"compositional/s": card})
    for metric, n in (("acc_swap_att", 3), ("acc_replace_rel", 1), ("acc", 4)):
        assert f"| compositional/s | {metric} (%) | 3 / {n} |" in md, md


def test_parse_task_specs():
    t = parse_task(
        "retrieval:coco/karpathy=/d/dataset_coco.json@scoring=rerank@rerank_k=5",
        {"batch_size": "8"},
    )
    assert (t.task, t.dataset, t.variant, t.path) == (
        "retrieval",
        "coco",
        "karpathy",
        "/d/dataset_coco.json",
    )
    assert t.scoring == "rerank" and t.rerank_k == 5 and t.batch_size == 8
    assert parse_task("zeroshot:synthetic/shape").variant == "shape"
    with pytest.raises(ValueError, match="did you mean 'scoring'"):
        parse_task("retrieval:x@scorng=global")
    with pytest.raises(ValueError, match="TASK:DATASET"):
        parse_task("retrieval")


def _save_run(root, name: str, method) -> None:
    from finegrain.recipes.base import RunConfig

    register_toy()
    root.mkdir(parents=True)
    save_yaml(RunConfig(name=name, method=ToyConfig()), root / "config.yaml")
    save_file(
        {k: v.contiguous() for k, v in method.state_dict().items()}, str(root / "model.safetensors")
    )


def test_cli_end_to_end(tmp_path, capsys):
    manifest, folder = write_manifest(tmp_path / "r"), write_imagefolder(tmp_path / "z", 1)
    _save_run(tmp_path / "run_a", "toy_a", ToyMethod())
    _save_run(tmp_path / "run_b", "toy_b", ToyMethod())
    out = tmp_path / "report"
    tasks = f"retrieval:manifest={manifest},zeroshot:imagefolder={folder}@templates=plain"
    rc = main(
        [
            "--checkpoint",
            str(tmp_path / "run_a"),
            "--checkpoint",
            str(tmp_path / "run_b"),
            "--tasks",
            tasks,
            "--set",
            "batch_size=4",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert set(data) == {"toy_a", "toy_b"}
    assert data["toy_a"]["retrieval/manifest/image_retrieval_recall@1"] == pytest.approx(
        data["toy_b"]["retrieval/manifest/image_retrieval_recall@1"]
    )  # same weights
    assert "zeroshot/imagefolder/acc1" in data["toy_a"]
    assert "| toy_a | toy_b |" in capsys.readouterr().out
    grid = out / "toy_a" / "retrieval" / "manifest"
    assert (grid / "retrieval_examples.png").stat().st_size > 1000
    assert (grid / "attention_maps.png").stat().st_size > 1000
    rc = main(
        ["--checkpoint", str(tmp_path / "run_a"), "--tasks", "retrieval:nope", "--out", str(out)]
    )
    assert rc == 2 and "unknown retrieval dataset 'nope'" in capsys.readouterr().err


def test_cli_one_failed_task_keeps_the_others(tmp_path, capsys):
    """A task with nothing to score (every line's negatives empty) fails in one line; the
    other task's results, protocol and plots are written and the exit code says 2."""
    manifest = write_manifest(tmp_path / "r")
    _save_run(tmp_path / "run_a", "toy_a", ToyMethod())
    empty = tmp_path / "r" / "boxes.jsonl"  # JSONL layout, images relative to its folder
    rows = [{"image": "img/red_0.png", "caption": "a red square", "neg_captions": ["", " "]}]
    empty.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "report"
    tasks = f"hardneg:jsonl={empty},retrieval:manifest={manifest}"
    argv = ["--checkpoint", str(tmp_path / "run_a"), "--tasks", tasks, "--out", str(out)]
    rc = main([*argv, "--quiet", "--set", "batch_size=4"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("finegrain eval: error: task hardneg/jsonl failed (toy_a): ")
    assert "no box left to score" in err[0] and "'empty_negative': 2" in err[0]
    data = json.loads((out / "results.json").read_text())
    assert "retrieval/manifest/image_retrieval_recall@1" in data["toy_a"]
    assert not any(k.startswith("hardneg/") for k in data["toy_a"])
    assert "retrieval/manifest" in json.loads((out / "protocol.json").read_text())["toy_a"]
    failed = json.loads((out / "failed.json").read_text())
    assert list(failed["toy_a"]) == ["hardneg/jsonl"]
    assert "- task hardneg/jsonl failed (toy_a): " in (out / "results.md").read_text()
    # the trainer's call (no failed=) still stops at the first failing task
    with pytest.raises(ValueError, match="no box left to score"):
        run_tasks(ToyMethod(), [parse_task(f"hardneg:jsonl={empty}")], progress=False)


def test_synthetic_splits_through_adapter():
    pytest.importorskip("finegrain.data.synthetic")
    tasks = [
        EvalTaskConfig(
            task="zeroshot",
            variant="shape",
            num_samples=16,
            templates="plain",
            descriptions="builtin",
        ),
        EvalTaskConfig(task="zeroshot", variant="novel", num_samples=8, templates="plain"),
        EvalTaskConfig(
            task="retrieval", variant="sentences", num_samples=8, scoring="rerank", rerank_k=3
        ),
        EvalTaskConfig(task="retrieval", variant="long", num_samples=8),
        EvalTaskConfig(
            task="segmentation", num_samples=4, templates="plain", background_threshold=0.2
        ),
    ]
    res = run_tasks(ConditionedToy(), tasks, progress=False)
    for k in (
        "zeroshot/synthetic/shape+desc/acc1",
        "zeroshot/synthetic/novel/acc5",
        "retrieval/synthetic/sentences+rerank+k3/image_retrieval_recall@1",
        "retrieval/synthetic/long/text_retrieval_recall@5",
        "segmentation/synthetic/miou",
    ):
        assert 0.0 <= res[k] <= 1.0, k
    with pytest.raises(ValueError, match="valid choices: shape, color_shape, pattern_shape, novel"):
        run_tasks(ToyMethod(), [EvalTaskConfig(task="zeroshot", variant="colour")], progress=False)


def test_run_tasks_uses_the_run_normalisation_found_above_out_dir(tmp_path):
    from finegrain.data.config import DataConfig
    from finegrain.eval import _run_data_config
    from finegrain.recipes.base import RunConfig

    register_toy()
    save_yaml(
        RunConfig(method=ToyConfig(), data=DataConfig(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))),
        tmp_path / "config.yaml",
    )
    found = _run_data_config(tmp_path / "eval" / "step_0000010")
    assert found is not None and tuple(found.mean) == (0.5, 0.5, 0.5)
    assert _run_data_config(tmp_path.parent / "elsewhere") is None
