"""``finegrain``: train, evaluate, prepare data, annotate, and the embedded demo.

    finegrain demo                                  # every method on synthetic scenes + report
    finegrain train --recipe clip_smoke train.steps=50 data.batch_size=16
    finegrain train --recipe clip_smoke --resume latest
    finegrain recipes                               # one line per recipe
    finegrain eval ... | finegrain data ... | finegrain annotate ...
    finegrain predict --checkpoint RUN_OR_SPEC --images DIR --classes a,b | --embeddings OUT.npy
    finegrain export RUN --format open_clip|hf|towers

User mistakes and run failures (unknown recipe or key, wrong type, missing path, unwritable
or full output dir, a run directory holding another run, corrupt/truncated or refused
checkpoint files, wrong file kinds, a device that is not there, non-finite loss or gradient,
too many broken samples, a distributed timeout) print one line on stderr and exit with code 2.

Nothing is overwritten silently: ``train`` refuses a run directory that holds another run
(``--resume latest`` continues it; ``--overwrite`` archives it to ``<dir>.old-<timestamp>``).
SIGINT/SIGTERM write a checkpoint at the next step boundary, record status ``interrupted``
and exit with 128 + the signal number (130 for SIGINT, 143 for SIGTERM), like a shell.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from finegrain.compat import DependencyError  # light: no torch
from finegrain.errors import USER_ERROR, one_line

if TYPE_CHECKING:  # the CLI imports torch-backed modules only once a command runs
    from finegrain.run_config import RunConfig

SUBCOMMANDS = {
    "eval": ("finegrain.eval_cli", "evaluate a checkpoint on declarative tasks"),
    "data": ("finegrain.data.cli", "inspect / convert / write data shards"),
    "annotate": ("finegrain.annotate.cli", "make GRAIN region annotations (MLLM + detector)"),
    "predict": ("finegrain.predict", "zero-shot labels or embeddings for a folder of images"),
    "export": ("finegrain.interop.export", "export a run to OpenCLIP / Hugging Face formats"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finegrain",
        description="Fine-grained vision-language pretraining (CLIP, SigLIP, FLAIR, GRAIN).",
        epilog="Start with `finegrain demo`; `finegrain <command> --help` for details.",
    )
    sub = p.add_subparsers(dest="command", metavar="<command>")
    t = sub.add_parser(
        "train",
        help="train a recipe: --recipe NAME [key.sub=value ...]",
        description="Train a recipe; override any config field with key.sub=value.",
    )
    t.add_argument("--recipe", help="recipe name (see `finegrain recipes`)")
    t.add_argument("--config", help="a run's config.yaml instead of a recipe")
    t.add_argument("--resume", metavar="latest|auto|PATH",
                   help="latest: the run's newest valid checkpoint (falls back past broken "
                   "ones); auto: resume if one exists, else start; or a checkpoint/run path")  # fmt: skip
    t.add_argument("--overwrite", action="store_true",
                   help="start over in a run dir holding another run (archived to "
                   "<dir>.old-<timestamp>)")  # fmt: skip
    t.add_argument("--output-dir", help="run directory (default $FINEGRAIN_HOME/runs/<name>)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value")
    sub.add_parser("recipes", help="list recipes, one line each")
    d = sub.add_parser("demo", help="train every method on synthetic scenes, compare, report",
                       description="The built-in benchmark: every registered method trained under "
                       "one budget on the built-in scenes (CPU, <= 10 min), evaluated on every "
                       "task; writes report.md, results.json and PNG figures.")  # fmt: skip
    d.add_argument("--methods", help="comma-separated subset (default: every registered method)")
    d.add_argument("--steps", type=int,
                   help="training steps per method (default 300; --full 600; flickr8k 300)")  # fmt: skip
    d.add_argument(
        "--image-size", type=int, help="pixels, a multiple of 16, >= 64 (default 128; flickr8k 192)"
    )
    d.add_argument("--device", help="cpu (default) | cuda")
    d.add_argument("--out", help="output folder (default $FINEGRAIN_HOME/demo/<time>)")
    d.add_argument("--seeds", type=int, help="train each method with N seeds (default 1; --full 3)")
    d.add_argument("--seed-start", type=int, default=0,
                   help="first seed (default 0): seeds K .. K+N-1, to train more seeds "
                   "elsewhere and pool them with --merge")  # fmt: skip
    d.add_argument("--merge", nargs="+", metavar="DIR",
                   help="write one report (into --out) from the runs of these report folders "
                   "(the same budget, distinct seeds); trains nothing")  # fmt: skip
    d.add_argument("--jobs", type=int,
                   help="method runs at once on CPU, each one torch thread (default: one per "
                   "core, at most one per run; 1 on cuda); numbers do not depend on it")  # fmt: skip
    tier = d.add_mutually_exclusive_group()
    tier.add_argument("--quick", action="store_true", help="a 1-minute smoke of the same pipeline")
    tier.add_argument("--full", action="store_true",
                      help="the full tier: 3 seeds, a larger budget (<= 60 min on 2 CPU cores); "
                      "--suite flickr8k: Lite0's and MiniLM's last blocks tuned too")  # fmt: skip
    d.add_argument("--budget", action="append", metavar="KEY=VALUE",
                   help="set any field of the tier's shared budget (repeatable), e.g. "
                   "--budget train_scenes=4096; --suite flickr8k: --budget text_trainable=2; "
                   "the report records the whole budget")  # fmt: skip
    d.add_argument("--overwrite", action="store_true", help="replace a report in --out")
    d.add_argument("--suite", choices=("scenes", "flickr8k"), default="scenes",
                   help="scenes (default): the built-in scenes; flickr8k: real photographs "
                   "(needs --data), finegrain.bench.flickr")  # fmt: skip
    d.add_argument("--data", help="--suite flickr8k: the folder holding captions.jsonl + images/")
    d.add_argument("--ablation", action="store_true",
                   help="--suite flickr8k: FLAIR's ablation variants instead of the methods")  # fmt: skip
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def build_config(recipe: str | None, config: str | None, overrides: list[str]) -> RunConfig:
    """RunConfig from a recipe name or a YAML file, with dotted overrides applied."""
    from finegrain.config import apply_overrides, load_yaml
    from finegrain.recipes.base import get_recipe
    from finegrain.run_config import RunConfig

    if bool(recipe) == bool(config):
        raise ValueError("give exactly one of --recipe NAME or --config FILE")
    cfg = get_recipe(recipe) if recipe else load_yaml(RunConfig, config)
    return apply_overrides(cfg, overrides) if overrides else cfg


def check_paths(cfg: RunConfig) -> None:
    """Fail fast, with one line, on data paths that do not exist."""
    from pathlib import Path

    if cfg.data.source in ("jsonl", "csv"):
        if not cfg.data.train:
            raise ValueError(f"data.source={cfg.data.source} needs data.train=PATH (a manifest)")
        if not Path(cfg.data.train).expanduser().is_file():
            raise FileNotFoundError(f"data.train: manifest not found: {cfg.data.train}")
    if cfg.data.source == "wds" and not cfg.data.train:
        raise ValueError(
            "data.source=wds needs data.train=SHARDS, e.g. data.train='cc3m/{00000..00331}.tar'"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from finegrain.config import save_yaml
    from finegrain.run_config import validate_run

    cfg = build_config(args.recipe, args.config, args.overrides)
    validate_run(cfg)
    if args.print_config:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            save_yaml(cfg, Path(tmp) / "c.yaml")
            print((Path(tmp) / "c.yaml").read_text(), end="")
        return 0
    check_paths(cfg)
    from finegrain.train.distributed import end_worker
    from finegrain.train.trainer import train

    summary = train(cfg, resume=args.resume, output_dir=args.output_dir,
                    overwrite=args.overwrite)  # fmt: skip
    if summary.get("status") == "interrupted":
        code = _interrupted(summary)
    else:
        if summary.get("metrics"):
            _print_results(summary["metrics"])
        code = 0
    end_worker(code)  # a torchrun worker leaves here, skipping a teardown that can abort
    return code


def _interrupted(summary: dict[str, Any]) -> int:
    """One line for a run stopped by SIGINT/SIGTERM; exit code 128 + signal (shell rule)."""
    import signal

    name = summary.get("signal") or "SIGINT"
    print(f"finegrain train: interrupted by {name} at step {summary.get('step')}; checkpoint "
          "written, continue with --resume latest", file=sys.stderr)  # fmt: skip
    return 128 + int(signal.Signals[name])


def cmd_recipes(_: argparse.Namespace) -> int:
    from finegrain.registry import RECIPES

    items = list(RECIPES.items())
    width = max((len(n) for n, _ in items), default=0)
    for name, fn in items:
        doc = (fn.__doc__ or "").strip().splitlines()
        print(f"{name:<{width}}  {doc[0] if doc else ''}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from finegrain.bench.run import options_from_args, run_benchmark

    if args.suite == "flickr8k":
        from finegrain.bench import flickr

        if args.seeds not in (None, 1) or args.seed_start or args.merge:
            raise ValueError("--suite flickr8k trains one seed per method (no --seeds, "
                             "--seed-start or --merge)")  # fmt: skip
        flickr.run_suite(flickr.options_from_args(args, args.argv), ablation=args.ablation)
        return 0
    if args.data or args.ablation:
        raise ValueError("--data and --ablation are for --suite flickr8k (the scenes suite "
                         "renders its own data)")  # fmt: skip
    if args.merge:
        from pathlib import Path

        from finegrain.bench.merge import merge_reports

        given = [f"--{k.replace('_', '-')}" for k in ("methods", "steps", "image_size", "device",
                 "seeds", "jobs", "budget") if getattr(args, k) is not None]  # fmt: skip
        given += [f"--{k}" for k in ("quick", "full") if getattr(args, k)]
        if given or args.seed_start:
            raise ValueError(f"--merge trains nothing: it takes report folders and --out, not "
                             f"{', '.join(given or ['--seed-start'])}")  # fmt: skip
        if not args.out:
            raise ValueError("--merge needs --out (the merged report's folder)")
        report = merge_reports([Path(f).expanduser() for f in args.merge],
                               Path(args.out).expanduser(), args.overwrite,
                               "finegrain " + " ".join(args.argv))  # fmt: skip
        print(report)
        return 0
    run_benchmark(options_from_args(args, args.argv))
    return 0


def _print_results(results: dict[str, float]) -> None:
    from finegrain.eval.report import markdown_table

    shown = {k: v for k, v in results.items() if not k.endswith("/seconds")}
    print(markdown_table(shown), end="")


def _dispatch(command: str, argv: list[str]) -> int:
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return int(module.main(argv) or 0)


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [
        ValueError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
        IsADirectoryError,
    ]
    from finegrain.config import ConfigError

    errors.append(ConfigError)
    return tuple(errors)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train,
    "recipes": cmd_recipes,
    "demo": cmd_demo,
}


def _parse_top(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """(parser, args) of a train/recipes/demo command line; ``key.sub=value`` overrides may sit
    between options (argparse exits with its usage line on anything else)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return parser, args


def parse_command(argv: list[str]) -> argparse.Namespace:
    """Parse a ``finegrain`` command line without running it, as far as that goes without its
    data or weights: argparse exits (code 2, usage line) on a bad flag; ``train`` also resolves
    its recipe and ``key.sub=value`` overrides, and a sub-command module's ``check_args`` (e.g.
    ``eval``'s ``--tasks``) runs (``ValueError`` / ``ConfigError`` naming the mistake).
    tests/test_readme.py validates the README's commands that CI cannot run this way."""
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        args = module.build_parser().parse_args(argv[1:])
        check = getattr(module, "check_args", None)
        if check is not None:
            check(args)
        return args
    _, args = _parse_top(argv)
    if args.command is None:
        raise ValueError("no finegrain command given (train, recipes, demo, eval, ...)")
    if args.command == "train":
        build_config(args.recipe, args.config, args.overrides)
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``finegrain`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:  # freed memory stays in the process (glibc): see finegrain.runtime
        from finegrain.runtime import configure_process

        configure_process()
    except ValueError as e:
        print(f"finegrain: error: {e}", file=sys.stderr)
        return USER_ERROR
    if argv and argv[0] in SUBCOMMANDS:  # the sub-CLI owns its arguments and --help
        try:
            return _dispatch(argv[0], argv[1:])
        except DependencyError as e:  # a sub-CLI that let it through: still one line
            print(f"finegrain {argv[0]}: error: {e}", file=sys.stderr)
            return USER_ERROR
    parser, args = _parse_top(argv)
    if args.command is None:
        parser.print_help()
        return USER_ERROR
    args.argv = argv
    try:
        return COMMANDS[args.command](args)
    except _user_errors() as e:
        msg = one_line(e)
        print(f"finegrain {args.command}: error: {msg}", file=sys.stderr)
        return USER_ERROR
    except RuntimeError as e:  # bad data past data.max_broken_fraction: one line, not a trace
        if type(e).__name__ != "TooManyBrokenSamples":
            raise
        print(f"finegrain {args.command}: data error: {e}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print(f"finegrain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
