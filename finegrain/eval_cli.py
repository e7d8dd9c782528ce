"""``finegrain eval``: evaluate one or more checkpoints on declarative tasks.

    finegrain eval --checkpoint runs/flair_cc3m --tasks retrieval:flickr8k=/data/flickr8k
    finegrain eval --checkpoint runs/clip --checkpoint open_clip:ViT-B-16=openai.pt \\
        --checkpoint hf:siglip-base --tasks zeroshot:imagefolder=/data/pets
    finegrain eval --checkpoint a.safetensors --checkpoint runs/b \\
        --tasks "zeroshot:synthetic/shape@descriptions=builtin,retrieval:synthetic/sentences" \\
        --set scoring=rerank --out reports/ab
    finegrain eval --checkpoint runs/grain --tasks region:synthetic@mode=roialign
    finegrain eval --checkpoint runs/clip --tasks hardneg:synthetic,compositional:synthetic
    finegrain eval --checkpoint runs/clip --tasks \\
        "hardneg:fgovd/1_attributes=FG-OVD/benchmarks@image_root=/data/coco"

Task syntax: ``TASK:DATASET[/VARIANT][=PATH][@key=value]...`` where keys are fields of the
task kind's config (``finegrain.eval.config``: ``ZeroShotTaskConfig``, ``RetrievalTaskConfig``,
``SegmentationTaskConfig``; e.g. ``scoring``, ``rerank_k``, ``templates``, ``descriptions``,
``fusion_alpha``, ``context_length``, ``background_threshold``, ``image_root``, ``limit``);
``--set key=value`` applies to every task whose kind has that key. Without ``--tasks`` the run config's ``eval.tasks``
are used. A task that fails on its data (nothing to score, a missing file) is reported in one
line and in ``failed.json`` while the other tasks' results are written; the exit code is then 2.
Writes ``results.json`` and ``results.md`` (one column per checkpoint) and the plots
under ``--out`` (default ``<run>/eval``; a folder that holds earlier results is never reused:
the next free ``<out>-2``, ``<out>-3``... is taken and named on stderr) and prints the table.

A top-level module, not part of ``finegrain.eval``: it loads checkpoints
(``finegrain.interop.load_spec``), which sit above the evaluation package (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from finegrain.checkpoint.run_dirs import resolve_run
from finegrain.config import from_dict
from finegrain.errors import USER_ERROR, run_subcommand
from finegrain.eval import run_tasks, write_report
from finegrain.eval.config import EvalTaskConfig, task_config_class
from finegrain.eval.report import failed_lines, markdown_table
from finegrain.interop import load_spec, split_spec
from finegrain.registry import EVAL_TASK_CONFIGS, suggest


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def parse_task(spec: str, common: dict[str, str] | None = None) -> EvalTaskConfig:
    """``retrieval:coco/karpathy=/data/coco.json@scoring=rerank`` -> a ``RetrievalTaskConfig``
    (the config class of the task kind); ``common`` options apply where the kind has them."""
    head, *opts = spec.strip().split("@")
    if ":" not in head:
        raise ValueError(f"task '{spec}' must look like TASK:DATASET[/VARIANT][=PATH][@key=value]")
    task, rest = head.split(":", 1)
    target, _, path = rest.partition("=")
    dataset, _, variant = target.partition("/")
    fields = _fields(task_config_class(task))  # unknown task: names the valid kinds
    data: dict[str, object] = {"task": task, "dataset": dataset, "variant": variant, "path": path}
    data.update({k: v for k, v in (common or {}).items() if k in fields})
    for o in opts:
        if "=" not in o:
            raise ValueError(f"task option '{o}' in '{spec}' must look like key=value")
        k, v = o.split("=", 1)
        data[k] = v
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ValueError(
            f"unknown option '{unknown[0]}' for {task} tasks{suggest(unknown[0], fields)}; "
            f"valid: {', '.join(fields)}"
        )
    return from_dict(EvalTaskConfig, data)


def _check_common(common: dict[str, str]) -> None:
    """A ``--set`` key that no task kind has is a mistake (one line naming the keys)."""
    known = sorted({f for _, cls in EVAL_TASK_CONFIGS.items() for f in _fields(cls)})
    for k in common:
        if k not in known:
            raise ValueError(
                f"unknown --set option '{k}'{suggest(k, known)}; valid: {', '.join(known)}"
            )


def _only(common: dict[str, str], task: EvalTaskConfig) -> dict[str, str]:
    fields = _fields(type(task))
    return {k: v for k, v in common.items() if k in fields}


def _split_specs(text: str) -> list[str]:
    return [s for s in (p.strip() for p in text.split(",")) if s]


COMMON_FIELDS = ("task", "dataset", "path", "split", "variant", "name", "image_root", "limit",
                 "num_examples", "num_samples", "batch_size", "context_length")  # fmt: skip


def task_help() -> str:
    """Every registered task kind with its datasets (synthetic variants) and its own options
    (name=default), for the ``--help`` epilog."""
    from finegrain.eval.datasets import SYNTHETIC_KINDS, task_datasets

    lines = ["tasks (TASK:DATASET[/VARIANT][=PATH][@key=value]...):"]
    for kind, cls in sorted(EVAL_TASK_CONFIGS.items()):
        lines.append(f"  {kind}: datasets {', '.join(task_datasets(kind))}")
        if kind in SYNTHETIC_KINDS:
            lines.append(f"    synthetic variants: {', '.join(SYNTHETIC_KINDS[kind])}")
        own = [f"{f.name}={f.default!r}" for f in dataclasses.fields(cls)
               if f.name not in COMMON_FIELDS and f.default is not dataclasses.MISSING]  # fmt: skip
        lines.append("    options: " + ", ".join(own) if own else "    options: (common only)")
    lines.append("  common options: " + ", ".join(COMMON_FIELDS[3:]))
    lines.append("every result comes with its protocol card (protocol.json: N, chance, settings)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finegrain eval",
        description=__doc__.split("\n\n")[0],
        epilog=task_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        metavar="RUN_OR_SPEC",
        help="run dir (or a demo folder holding one run), checkpoint dir, .safetensors file, "
        "or a spec open_clip:MODEL=FILE"
        " | hf:DIR | flair:FILE (repeat to compare)",
    )
    p.add_argument(
        "--tasks", default="", help="comma-separated TASK:DATASET[/VARIANT][=PATH][@k=v]"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="key=value",
        help="task option applied to every task whose kind has it",
    )
    p.add_argument("--out", default="", help="output folder (default: <first run>/eval)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _label(ckpt: str, run_name: str, taken: set[str]) -> str:
    label = run_name if run_name and run_name not in taken else Path(ckpt).name
    while label in taken:
        label += "'"
    return label


def check_device(device: str) -> None:
    """One-line error for a device that does not exist here (before any model is built)."""
    import torch

    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N; got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use cpu")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPUs")


def run_info(ckpt: str, weights: Path | None, cfg: object) -> dict[str, object]:
    """Checkpoint spec, the weights file it resolved to at load, that file's training step
    (from a ``step_N`` folder or file name, when there is one) and the run's seed, for the
    protocol card of every number."""
    found = re.findall(r"step[_-]?(\d+)", str(weights)) if weights is not None else []
    return {
        "checkpoint": ckpt,
        "weights": None if weights is None else str(weights),
        "step": int(found[-1]) if found else None,
        "seed": getattr(cfg, "seed", None),
    }


def _fresh(out: Path) -> Path:
    """``out`` when new or empty, else the next free ``out-2``, ``out-3``...: an evaluation
    never replaces earlier results."""
    from finegrain.train.guard import unique_dir

    fresh = unique_dir(out)
    if fresh != out:
        print(f"finegrain eval: {out} holds earlier results; writing to {fresh}", file=sys.stderr)
    return fresh


def _common_options(items: list[str]) -> dict[str, str]:
    """``--set key=value`` options as a dict, checked against every task kind's fields."""
    common = {}
    for s in items:
        if "=" not in s:
            raise ValueError(f"--set '{s}' must look like key=value")
        k, v = s.split("=", 1)
        common[k] = v
    _check_common(common)
    return common


def check_args(args: argparse.Namespace) -> None:
    """Validate ``--set`` and every ``--tasks`` spec without loading a model or data (one-line
    errors; ``finegrain.cli.parse_command``)."""
    common = _common_options(args.set)
    for spec in _split_specs(args.tasks):
        parse_task(spec, common)


def run(args: argparse.Namespace) -> int:
    common = _common_options(args.set)
    check_device(args.device)
    results: dict[str, dict[str, float]] = {}
    protocols: dict[str, dict[str, dict]] = {}
    failed: dict[str, dict[str, str]] = {}  # label -> {task prefix: one-line reason}
    out = _fresh(Path(args.out)) if args.out else None
    for ckpt in args.checkpoint:
        method, cfg, weights = load_spec(ckpt, device=args.device)
        specs = _split_specs(args.tasks)
        tasks = [parse_task(s, common) for s in specs] or [
            from_dict(EvalTaskConfig, {**dataclasses.asdict(t), **_only(common, t)})
            for t in cfg.eval.tasks
        ]
        if not tasks:
            raise ValueError(f"no --tasks given and the run config of {ckpt} lists no eval.tasks")
        if out is None:
            base = Path(ckpt)
            if split_spec(ckpt)[0]:  # an external checkpoint: never write into its folder
                out = _fresh(Path("eval"))
            else:
                out = _fresh((resolve_run(base) if base.is_dir() else base.parent) / "eval")
        label = _label(ckpt, getattr(cfg, "name", ""), set(results))
        protocols[label], failed[label] = {}, {}
        results[label] = run_tasks(
            method,
            tasks,
            device=args.device,
            out_dir=out / label,
            progress=not args.quiet,
            data_cfg=cfg.data,
            protocols=protocols[label],
            run_info=run_info(ckpt, weights, cfg),
            failed=failed[label],
        )
    assert out is not None
    for line in failed_lines(failed):  # one line each; the other tasks' results are kept
        print(f"finegrain eval: error: {line}", file=sys.stderr)
    if not any(results.values()):
        return USER_ERROR
    paths = write_report(results, out, protocols, failed)
    shown = {
        m: {k: v for k, v in r.items() if not k.endswith("/seconds")} for m, r in results.items()
    }
    print(markdown_table(shown, protocols), end="")
    print(f"wrote {paths['json']} and {paths['markdown']}", file=sys.stderr)
    return USER_ERROR if any(failed.values()) else 0


def main(argv: list[str]) -> int:
    """Entry point of ``finegrain eval``; returns the exit code (2 for user mistakes)."""
    return run_subcommand("finegrain eval", build_parser(), run, argv)
