"""Nothing lost, nothing silent: run-directory ownership, stop signals, output folders.

- **One run per directory.** ``claim_run_dir`` refuses to start a new run in a directory that
  holds another one (a config, checkpoints or a summary): resume it with ``--resume latest``,
  or pass ``--overwrite``, which *archives* the old run by renaming it to
  ``<dir>.old-<YYYYmmdd-HHMMSS>`` (nothing is deleted; remove archives yourself).
- **Stop signals.** ``StopSignals`` turns the first SIGINT/SIGTERM (what clusters send before
  preemption) into a request the trainer honours at the next step boundary: it writes a
  checkpoint and ends with status ``interrupted``; the CLI exits with ``128 + signal``
  (130 for SIGINT, 143 for SIGTERM). A second signal stops at once (Python's default).
- **New folder per evaluation.** ``unique_dir`` gives ``eval``, then ``eval-2``, ``eval-3``...
  so an evaluation never replaces earlier results.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from finegrain.checkpoint import latest_valid_checkpoint
from finegrain.train import checkpoint as ckpt
from finegrain.train import distributed as dist_utils

RUN_MARKERS = ("config.yaml", "summary.json", "ckpt")


class RunDirInUse(ValueError):
    """The run directory holds another run (one line: how to resume or overwrite)."""


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (disk full, read-only); the previous one is intact."""


class DistributedTimeout(ValueError):
    """A collective did not finish within ``train.timeout_s`` (a rank hung or died)."""


def describe_run(run_dir: Path) -> str | None:
    """A short description of the run ``run_dir`` holds, or None when it holds none."""
    if not run_dir.is_dir() or not any((run_dir / m).exists() for m in RUN_MARKERS):
        return None
    steps = sorted(p.name for p in (run_dir / "ckpt").glob("step_*")) if (
        run_dir / "ckpt").is_dir() else []  # fmt: skip
    parts = []
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        parts.append(f"status {summary.get('status')} at step {summary.get('step')}")
    except (OSError, ValueError):
        pass
    if steps:
        parts.append(f"{len(steps)} checkpoint(s), newest {steps[-1]}")
    if not parts and not (run_dir / "ckpt").exists() and not (run_dir / "summary.json").exists():
        parts.append("a config.yaml")
    return ", ".join(parts) or "run files"


def archive_path(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cand = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 2
    while cand.exists():
        cand = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
        n += 1
    return cand


def check_run_dir(run_dir: Path, *, overwrite: bool) -> str | None:
    """Refuse (``RunDirInUse``) a directory holding another run unless ``overwrite``; returns
    the description of the run that ``archive_run`` will move away (None: nothing there)."""
    held = describe_run(run_dir)
    if held and not overwrite:
        raise RunDirInUse(
            f"run directory {run_dir} holds another run ({held}); resume it with --resume latest, "
            "or pass --overwrite to archive it to "
            f"{run_dir.name}.old-<timestamp>, or choose another --output-dir"
        )
    return held


def archive_run(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``<dir>.old-<timestamp>`` (nothing deleted); returns the new path."""
    dest = archive_path(run_dir)
    try:
        os.replace(run_dir, dest)
    except OSError:  # e.g. across mount points: copy then remove
        shutil.move(str(run_dir), str(dest))
    return dest


def ensure_writable(run_dir: Path) -> None:
    """Create ``run_dir``; a clear ``ValueError`` when that or writing into it fails."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output dir {run_dir} is not writable: {e.strerror or e}") from None


def claim_run_dir(run_dir: Path, resume: str | None, overwrite: bool,
                  is_main: bool) -> tuple[Path | None, list[str]]:  # fmt: skip
    """(checkpoint to resume from or None, notes) and the run directory ready to write.

    ``resume``: ``latest`` / a path (verified; newer broken checkpoints are skipped with a
    note), ``auto`` (resume if a valid checkpoint exists, else start: what a torchrun restart
    does, ``TORCHELASTIC_RESTART_COUNT > 0`` implies it), or None: a new run, refused in a
    directory holding another run unless ``overwrite`` (then rank 0 archives the old one).
    Collective under torchrun: every rank checks before rank 0 moves anything."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if resume is None and restarted:
        resume = "auto"
    if resume == "auto":
        found, _ = latest_valid_checkpoint(run_dir)
        resume, overwrite = ("latest", overwrite) if found is not None else (None, True)
    notes: list[str] = []
    resume_dir, held = None, None
    if resume is not None:
        resume_dir, notes = ckpt.find_resume(resume, run_dir)
    else:
        held = check_run_dir(run_dir, overwrite=overwrite)
    dist_utils.barrier()
    if is_main:
        if held and not restarted:
            notes.append(f"archived the previous run ({held}) to {archive_run(run_dir)}")
        ensure_writable(run_dir)
    dist_utils.barrier()
    return resume_dir, notes


def grads_finite(params: list[torch.nn.Parameter]) -> bool:
    """Whether every gradient (local shard under FSDP) is finite: one fused max-norm per step
    (``torch.nn.utils.get_total_norm``, public since torch 2.6). The inf-norm (max |g|) never
    overflows, so large finite gradients count as finite (a 2-norm of 1e30 entries is inf),
    and a NaN anywhere makes it NaN."""
    # an FSDP rank may hold an empty shard: the inf-norm of an empty tensor has no identity
    local = [g for g in (_local(p.grad) for p in params if p.grad is not None) if g.numel()]
    if not local:
        return True
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if total_norm is None:  # torch < 2.6 (our floor is 2.3): one max per tensor, NaN propagates
        return bool(torch.isfinite(torch.stack([g.abs().amax() for g in local]).amax()))
    return bool(torch.isfinite(total_norm(local, norm_type=math.inf)))


def nonfinite_grads(module: torch.nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds NaN or inf (the error message)."""
    return [n for n, p in module.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(_local(p.grad)).all())]  # fmt: skip


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def unique_dir(base: Path) -> Path:
    """``base`` when it does not exist or is empty, else ``base-2``, ``base-3``, ..."""
    if not base.exists() or (base.is_dir() and not any(base.iterdir())):
        return base
    n = 2
    while (cand := base.with_name(f"{base.name}-{n}")).exists():
        n += 1
    return cand


class StopSignals:
    """Record SIGINT/SIGTERM instead of dying; ``requested`` is the first signal number (or 0).

    Installed only from the main thread (Python's rule); the previous handlers come back on
    ``restore`` and after the first signal, so a second Ctrl-C interrupts immediately."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = 0
        self._old: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            self.requested = signum
        self.restore()

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.requested).name if self.requested else ""


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name if signum else ""


def agreed_stop_signal(stop: StopSignals, device: torch.device, distributed: bool) -> str:
    """The first SIGINT/SIGTERM any rank received ('' when none), agreed by every rank at a
    step boundary (collective when ``distributed``), so all ranks stop at the same step."""
    flag = float(stop.requested)
    if distributed:
        flag = dist_utils.all_reduce_max(flag, device)
    return signal_name(int(flag))


def explain_distributed_error(e: BaseException, timeout_s: float) -> DistributedTimeout | None:
    """A one-line ``DistributedTimeout`` for a collective that failed because another rank died
    or hung (None when ``e`` is something else, or the run is not distributed)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    rank = os.environ.get("RANK", "?")
    if not torch.distributed.is_initialized():  # failed while setting up, not in a collective
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        return DistributedTimeout(
            f"rank {rank}: could not set up the process group with the other ranks ({first}); "
            "check that every rank started and can reach MASTER_ADDR:MASTER_PORT"
        )
    if is_peer_lost(e):  # torchrun restarts or ends the job
        return DistributedTimeout(
            f"rank {rank}: another rank's process died during a collective (see its log); "
            "under torchrun --max-restarts the job restarts from the last checkpoint"
        )
    if is_timeout(e):
        return DistributedTimeout(
            f"rank {rank}: a collective did not complete within train.timeout_s={timeout_s:g}s; "
            "another rank hung or died (see its log); raise train.timeout_s if steps are "
            "legitimately that slow"
        )
    return None


def is_timeout(e: BaseException) -> bool:
    """Whether ``e`` is a process-group collective timing out (gloo / nccl wording)."""
    text = str(e).lower()
    return "timed out" in text or "timeout" in text


def is_peer_lost(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another rank's process went away."""
    text = str(e).lower()
    return "closed by peer" in text or "reset by peer" in text or "broken pipe" in text


__all__ = [
    "CheckpointWriteError",
    "DistributedTimeout",
    "RunDirInUse",
    "StopSignals",
    "agreed_stop_signal",
    "archive_run",
    "check_run_dir",
    "claim_run_dir",
    "grads_finite",
    "nonfinite_grads",
    "describe_run",
    "explain_distributed_error",
    "is_peer_lost",
    "is_timeout",
    "unique_dir",
]
