"""Run ``finegrain <args>`` with one fault injected: the process SIGKILLs itself at a chosen
point (what an OOM killer, a preempted node or a power cut does: no handler runs).

The recipe ``toy_faults`` (registered here) trains the tiny ``ToyCLIP`` of ``tests/helpers/toy_method``
on its in-memory ``ToyLoader`` (rank-aware, resumable) through the real CLI and ``Trainer``;
its evaluation is a toy retrieval task run through ``Trainer.evaluate`` (which must isolate
the training RNG and write a fresh results folder), so a run takes seconds on a busy CPU.
Environment: ``FAULT_RANK`` limits a fault to one torchrun rank and ``FAULT_ATTEMPT`` to one
torchrun attempt (``TORCHELASTIC_RESTART_COUNT``); ``FAULT_SLEEP`` makes the fault a hang.

    python tests/faults/inject.py step:K        -- train ...   # inside step K, grads computed
    python tests/faults/inject.py ckpt:N:model  -- train ...   # N-th checkpoint, half the weights
    python tests/faults/inject.py ckpt:N:state  -- train ...   # N-th checkpoint, half the state
    python tests/faults/inject.py ckpt:N:latest -- train ...   # after the move, before `latest`
    python tests/faults/inject.py eval:N        -- train ...   # N-th evaluation, after its work
    python tests/faults/inject.py signal:K:SIGTERM -- train ...  # a polite stop during step K
    python tests/faults/inject.py none          -- train ...
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from pathlib import Path


def _die() -> None:
    if os.environ.get("FAULT_SLEEP"):  # a hung rank instead of a dead one
        import time

        time.sleep(float(os.environ["FAULT_SLEEP"]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _half_then_die(path: str | Path) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    _die()


def toy_faults_recipe():  # noqa: ANN201
    """ToyCLIP on ToyLoader (tests only)."""
    from finegrain.eval.config import EvalTaskConfig

    from helpers import toy_method

    cfg = toy_method.toy_run_config("", steps=10, checkpoint_every=2)
    cfg.name, cfg.output_dir = "toy_faults", ""
    cfg.eval.tasks = [EvalTaskConfig(task="retrieval", dataset="synthetic")]
    return cfg


def toy_loader(method, cfg, *, rank=0, world_size=1, seed=0, **kw):  # noqa: ANN001, ANN003, ANN201
    from helpers import toy_method

    return toy_method.ToyLoader(batch_size=cfg.batch_size, seed=seed, rank=rank,
                                world_size=world_size)  # fmt: skip


def toy_eval(method, tasks, **kw):  # noqa: ANN001, ANN003, ANN201
    """Text->image recall@1 on 32 held-out pairs; draws from the global RNG on purpose."""
    import torch
    import torch.nn.functional as F

    from helpers import toy_method

    method.eval()
    data = next(iter(toy_method.ToyLoader(n=32, batch_size=32, seed=99)))
    with torch.no_grad():
        f = method.features({k: v + 0.01 * torch.randn_like(v) for k, v in data.items()})
    sims = F.normalize(f["text"], dim=-1) @ F.normalize(f["image"], dim=-1).t()  # (32, 32)
    return {"retrieval/toy/image_retrieval_recall@1": (sims.argmax(1) == torch.arange(32))
            .float().mean().item()}  # fmt: skip


def toy_setup() -> list[tuple[object, str, object]]:
    """Register the ``toy_faults`` recipe (once) and return the (module, attribute, value)
    patches that route the loader and the evaluation to the toy ones."""
    tests = str(Path(__file__).resolve().parents[1])
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import finegrain.train.evaluation as evaluation
    import finegrain.train.trainer as trainer
    from finegrain.registry import RECIPES

    if "toy_faults" not in RECIPES:
        RECIPES.add("toy_faults", toy_faults_recipe)
    return [(trainer, "method_loader", toy_loader), (evaluation, "run_tasks", toy_eval)]


def _applies() -> bool:
    rank_ok = os.environ.get("FAULT_RANK", os.environ.get("RANK", "0")) == os.environ.get(
        "RANK", "0")  # fmt: skip
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return rank_ok and os.environ.get("FAULT_ATTEMPT", attempt) == attempt


def install(fault: str) -> None:
    kind, *rest = fault.split(":")
    if kind == "none" or not _applies():
        return
    from finegrain.train import checkpoint as ckpt
    from finegrain.train.trainer import Trainer

    n = int(rest[0])
    if kind == "step":
        orig_step = Trainer.train_step

        def train_step(self, micro):  # noqa: ANN001, ANN202
            if self.step + 1 == n:
                self.scaler.step = lambda opt: _die()  # gradients exist, weights not updated
            return orig_step(self, micro)

        Trainer.train_step = train_step
    elif kind == "ckpt":
        phase, calls = rest[1], {"n": 0}
        orig_save_file, orig_torch_save = ckpt.save_file, ckpt.torch.save
        orig_atomic = ckpt.write_atomic_text

        def save_file(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
            calls["n"] += 1
            orig_save_file(tensors, filename, metadata=metadata)
            if calls["n"] == n and phase == "model":
                _half_then_die(filename)

        def torch_save(obj, f, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            orig_torch_save(obj, f, *a, **k)
            if calls["n"] == n and phase == "state" and str(f).endswith(ckpt.STATE_FILE):
                _half_then_die(f)

        def write_atomic_text(path, text):  # noqa: ANN001, ANN202
            if calls["n"] == n and phase == "latest":
                _die()
            orig_atomic(path, text)

        ckpt.save_file, ckpt.write_atomic_text = save_file, write_atomic_text
        ckpt.torch.save = torch_save
    elif kind == "eval":
        import finegrain.train.evaluation as ev

        orig_run, calls = ev.run_tasks, {"n": 0}

        def run_tasks(*a, **k):  # noqa: ANN002, ANN003, ANN202
            calls["n"] += 1
            out = orig_run(*a, **k)
            if calls["n"] == n:
                _die()
            return out

        ev.run_tasks = run_tasks
    elif kind == "signal":
        orig_step, signum = Trainer.train_step, signal.Signals[rest[1]]

        def train_step(self, micro):  # noqa: ANN001, ANN202
            if self.step + 1 == n:
                os.kill(os.getpid(), signum)  # arrives mid-step, as a scheduler's would
            return orig_step(self, micro)

        Trainer.train_step = train_step
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung test dumps our stacks
    fault, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: inject.py FAULT -- finegrain args"
    for module, name, value in toy_setup():
        setattr(module, name, value)
    install(fault)
    from finegrain.cli import main

    sys.exit(main(args))
