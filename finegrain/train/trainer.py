"""The one training loop, for every method.

The trainer knows only the method contract (``finegrain/methods/base.py``): ``forward`` /
``features`` + ``loss_from_features`` -> ``MethodOutput``, ``param_groups``,
``after_optimizer_step``, ``make_transform``, ``make_collate``, ``fsdp_units``. It never looks
at a method's name.

Around the loop: ``resume`` (what a checkpoint holds for exact resume), ``evaluation``
(eval during training), ``nonfinite`` (the NaN/inf policy), ``stats`` (per-step scalars and
the stats channel), ``guard`` (run directory, stop signals, distributed failures).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from finegrain.checkpoint import CONFIG_FILE, find_config
from finegrain.config import finegrain_home, load_yaml, save_yaml, to_dict
from finegrain.data.for_method import method_loader
from finegrain.methods.base import build_method
from finegrain.outputs import MethodOutput
from finegrain.run_config import RunConfig, validate_trainer
from finegrain.train import checkpoint as ckpt
from finegrain.train import distributed as dist_utils
from finegrain.train import guard, nonfinite
from finegrain.train.evaluation import evaluate_during_training
from finegrain.train.guard import ensure_writable as ensure_writable  # re-exported
from finegrain.train.logging import RunLogger, write_json
from finegrain.train.nonfinite import NonFiniteLossError as NonFiniteLossError  # re-exported
from finegrain.train.optim import build_optimizer, lr_at, set_lr
from finegrain.train.resume import load_run_state, save_run_state
from finegrain.train.stats import batch_size, step_scalars, step_stats
from finegrain.train.step import exact_accumulation, to_device


def resolve_run_dir(cfg: RunConfig, output_dir: str | None = None) -> Path:
    """``output_dir`` argument > ``cfg.output_dir`` > ``$FINEGRAIN_HOME/runs/<name>``."""
    d = output_dir or cfg.output_dir or str(finegrain_home() / "runs" / cfg.name)
    return Path(d).expanduser()


class Trainer:
    """Build everything from a ``RunConfig`` and train; ``method``/``loader`` may be injected."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        method: torch.nn.Module | None = None,
        loader: Any = None,
        resume: str | None = None,
        output_dir: str | None = None,
        overwrite: bool = False,
    ) -> None:
        validate_trainer(cfg)
        self.cfg, self.t = cfg, cfg.train
        self.run_dir = resolve_run_dir(cfg, output_dir)
        self.info = dist_utils.init_distributed(self.t.device, timeout_s=self.t.timeout_s)
        self.device = self.info.device
        self.notes: list[str] = []  # what happened before the log existed (fallbacks, archives)
        resume_dir = self._claim_run_dir(resume, overwrite)
        if resume_dir is not None:
            self._check_resume_config(resume_dir)
        torch.manual_seed(cfg.seed)  # identical init on every rank
        if method is None:
            method = build_method(cfg.method)
        self.method = method.to(self.device)
        self.method.train()
        if loader is None:  # the method's batches (cached frozen bottoms with data.feature_cache)
            loader = method_loader(
                self.method,
                cfg.data,
                rank=self.info.rank,
                world_size=self.info.world_size,
                seed=cfg.seed,
                device=self.device,
                barrier=dist_utils.barrier if self.info.enabled else None,
            )
        self.loader = loader
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.t.precision == "fp16")
        self.step, self.skipped, self.stop_signal, self.overflows = 0, 0, "", 0
        self.stats: dict[str, float] = {}  # run totals of the stats channel
        _seed_all(cfg.seed + 1 + self.info.rank)  # per-rank training randomness
        point = None
        if resume_dir is not None:
            point = load_run_state(resume_dir, method=self.method, scaler=self.scaler,
                                   loader=self.loader, info=self.info)  # fmt: skip
            self.step, self.skipped, self.stats = point.step, point.skipped, point.stats
        self.model = self._wrap()  # FSDP swaps parameters: the optimizer comes after
        self.optimizer = build_optimizer(self.method, self.t)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if point is not None:
            dist_utils.load_optimizer_state(self.method, self.optimizer, point.optimizer,
                                            full=self._fsdp)  # fmt: skip

    # ---- setup ----------------------------------------------------------------------
    def _claim_run_dir(self, resume: str | None, overwrite: bool) -> Path | None:
        resume_dir, notes = guard.claim_run_dir(self.run_dir, resume, overwrite,
                                                self.info.is_main)  # fmt: skip
        self.notes += notes
        return resume_dir

    def _check_resume_config(self, resume_dir: Path) -> None:
        try:
            saved = load_yaml(RunConfig, find_config(resume_dir))
        except FileNotFoundError:
            return
        ckpt.check_same_method(saved, self.cfg, str(resume_dir))

    @property
    def _fsdp(self) -> bool:
        return self.info.enabled and self.t.distributed == "fsdp"

    def _wrap(self) -> torch.nn.Module:
        model: torch.nn.Module = self.method
        self.replicated: list[torch.nn.Parameter] = []  # params whose grads we all-reduce
        if self._fsdp:
            model = dist_utils.shard_fsdp(self.method, self.info, self.t.precision == "bf16")
            self.replicated = dist_utils.unsharded_params(self.method)
            dist_utils.broadcast_params(self.replicated)
        elif self.info.enabled and self.t.accum_steps == 1:
            model = dist_utils.wrap_ddp(self.method, self.info)
        elif self.info.enabled:  # exact accumulation bypasses DDP: same init, manual all-reduce
            for p in self.method.state_dict().values():
                torch.distributed.broadcast(p, 0)
        self.features_fn = self.method.features
        self.loss_fn = self.method.loss_from_features
        if self.t.compile:
            model = torch.compile(model)
            self.features_fn = torch.compile(self.method.features)
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.t.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # ---- one step -------------------------------------------------------------------
    def _finite(self, out: MethodOutput) -> bool:
        """Loss finite on every rank (collective); raises under ``nan_policy=stop``."""
        return nonfinite.loss_finite(out, self.step + 1, self.t.nan_policy, self.device)

    def train_step(self, micro: list[dict[str, Any]]) -> tuple[MethodOutput, bool]:
        """Gradients + update for one optimizer step; returns (output, applied)."""
        self.optimizer.zero_grad(set_to_none=True)
        if len(micro) == 1:
            with self.autocast():
                out = self.model(micro[0])
            if not self._finite(out):
                return out, False
            self.scaler.scale(out.loss).backward()
        else:
            out, ok = exact_accumulation(
                micro,
                self.features_fn,
                self.loss_fn,
                scale=self.scaler.scale,
                autocast=self.autocast,
                check_loss=self._finite,
                device=self.device,
            )
            if not ok:
                return out, False
            if self.info.enabled and self.t.distributed == "ddp":
                dist_utils.all_reduce_grads(self.params, self.info.world_size)
        if self.replicated:  # FSDP: parameters left outside the shards (e.g. scalars)
            dist_utils.all_reduce_grads(self.replicated, self.info.world_size)
        if not self.scaler.is_enabled() and not self._grads_finite():
            self.optimizer.zero_grad(set_to_none=True)
            return out, False
        if self.t.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.t.grad_clip)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale:
            self.overflows += 1  # fp16 loss-scale overflow: GradScaler skipped this update
            return out, False
        return out, True

    def _grads_finite(self) -> bool:
        """All gradients finite (every rank agrees); raises under ``nan_policy=stop``. fp16
        runs leave this to ``GradScaler``."""
        return nonfinite.grads_finite(self.params, self.method, self.step + 1,
                                      self.t.nan_policy, self.device)  # fmt: skip

    # ---- the loop -------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps``; returns the run summary (also written to summary.json)."""
        t, info = self.t, self.info
        if info.is_main:
            save_yaml(self.cfg, self.run_dir / CONFIG_FILE)
        log = RunLogger(
            self.run_dir,
            rank=info.rank,
            total_steps=t.steps,
            start_step=self.step,
            log_every=t.log_every,
            progress=t.progress,
            wandb=t.wandb,
            run_name=self.cfg.name,
            config=to_dict(self.cfg),
        )
        metrics: dict[str, float] = {}
        start, first_step, status = time.perf_counter(), self.step, "failed"
        for note in self.notes:
            log.write(note)
        if first_step:
            log.write(f"resumed from step {first_step}")
        stop = guard.StopSignals()
        try:
            it = iter(self.loader)
            while self.step < t.steps:
                self._one_step(it, log)
                if self._stop_requested(stop):
                    status = self._interrupt(log)
                    break
                if (
                    t.checkpoint_every
                    and self.step % t.checkpoint_every == 0
                    and self.step < t.steps
                ):
                    self.save()
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                    metrics = self.evaluate(log)
            if status != "interrupted":
                self.save()
                metrics = self.evaluate(log, final=True)
                self.stats = dist_utils.sum_over_ranks(self.stats)
                status = "completed"
        except NonFiniteLossError:
            status = "stopped: non-finite loss"
            raise
        except guard.CheckpointWriteError:
            status = "failed: checkpoint write"
            raise
        finally:
            stop.restore()
            log.close()
            summary = self._summary(status, metrics, time.perf_counter() - start, first_step)
            summary["signal"] = self.stop_signal
        return summary

    def _stop_requested(self, stop: guard.StopSignals) -> bool:
        """Whether any rank got SIGINT/SIGTERM (agreed by all ranks at this step boundary)."""
        self.stop_signal = guard.agreed_stop_signal(stop, self.device, self.info.enabled)
        return bool(self.stop_signal)

    def _interrupt(self, log: RunLogger) -> str:
        path = self.save()
        log.write(f"{self.stop_signal} at step {self.step}: checkpoint written"
                  f"{f' to {path}' if path else ''}; resume with --resume latest")  # fmt: skip
        return "interrupted"

    def _one_step(self, it: Any, log: RunLogger) -> None:
        t0 = time.perf_counter()
        micro = [next(it) for _ in range(self.t.accum_steps)]
        t1 = time.perf_counter()
        micro = [to_device(b, self.device) for b in micro]
        lr = lr_at(self.step, self.t)
        set_lr(self.optimizer, lr)
        overflows = self.overflows
        out, applied = self.train_step(micro)
        if not applied and self.overflows > overflows:
            log.write(f"step {self.step + 1}: fp16 loss-scale overflow, update skipped "
                      f"(scale now {self.scaler.get_scale():g}; {self.overflows} so far)")  # fmt: skip
        elif not applied:
            self.skipped += 1
            log.write(f"step {self.step + 1}: non-finite loss or gradient, step skipped "
                      f"({self.skipped} so far)")  # fmt: skip
        self.step += 1
        if applied:  # a skipped step changed nothing: no EMA / centre update either
            self.method.after_optimizer_step(self.step, self.t.steps)
        stats = step_stats(micro, out)
        for k, v in stats.items():
            self.stats[k] = self.stats.get(k, 0.0) + v
        n = sum(batch_size(b) for b in micro)
        dt = time.perf_counter() - t0
        with_data = self.step % self.t.log_every == 0 and hasattr(self.loader, "stats")
        scalars = step_scalars(out, stats, lr=lr, samples=n, data_wait_s=t1 - t0,
                               step_time_s=dt, skipped=self.skipped,
                               loader_stats=self.loader.stats() if with_data else None)  # fmt: skip
        log.step(self.step, scalars, n / max(dt, 1e-9))

    # ---- checkpoint & eval ----------------------------------------------------------
    def save(self) -> Path | None:
        """Checkpoint (collective: every rank contributes its RNG and data position)."""
        return save_run_state(self.run_dir, step=self.step, skipped=self.skipped,
                              method=self.method, optimizer=self.optimizer,
                              scaler=self.scaler, loader=self.loader, stats=self.stats,
                              info=self.info, fsdp=self._fsdp,
                              keep_last=self.t.keep_last)  # fmt: skip

    def evaluate(self, log: RunLogger, final: bool = False) -> dict[str, float]:
        """Run ``cfg.eval.tasks`` on rank 0 (training RNG untouched); {} when none.

        The final evaluation also writes plots and ``eval/results.{json,md}``."""
        return evaluate_during_training(self.method, self.cfg, run_dir=self.run_dir,
                                        device=self.device, step=self.step, log=log,
                                        is_main=self.info.is_main, final=final)  # fmt: skip

    def _summary(self, status: str, metrics: dict[str, float], wall: float, first: int) -> dict:
        stats = self.loader.stats() if hasattr(self.loader, "stats") else {}
        summary = {
            "name": self.cfg.name,
            "status": status,
            "step": self.step,
            "steps": self.t.steps,
            "skipped_steps": self.skipped,
            "fp16_overflows": self.overflows,
            "data": stats,
            "metrics": metrics,
            "stats": dict(sorted(self.stats.items())),
            "wall_s": round(wall, 3),
            "steps_per_s": (self.step - first) / wall if wall > 0 else math.nan,
            "world_size": self.info.world_size,
        }
        if self.info.is_main:
            try:
                write_json(self.run_dir / "summary.json", summary)
            except OSError as e:  # a full disk must not hide the error that stopped the run
                warnings.warn(f"could not write summary.json: {e}", stacklevel=2)
        return summary


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    cfg: RunConfig,
    *,
    resume: str | None = None,
    output_dir: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build a ``Trainer`` from ``cfg`` and run it; tears the process group down after.

    ``resume``: None (a new run; refused in a directory holding another run unless
    ``overwrite``), ``latest`` / a path (verified, falling back to the newest valid
    checkpoint), or ``auto`` (resume when a checkpoint exists, else start)."""
    try:
        summary = Trainer(cfg, resume=resume, output_dir=output_dir, overwrite=overwrite).fit()
        # every rank done with its collectives before any tears the group down (the abort
        # seen at a finished FSDP rank's exit came from interpreter teardown instead: see
        # distributed.end_worker, which the CLI's torchrun workers leave through)
        dist_utils.barrier()
        return summary
    except RuntimeError as e:
        explained = guard.explain_distributed_error(e, cfg.train.timeout_s)
        if explained is not None:
            raise explained from None
        raise
    finally:
        dist_utils.cleanup()
