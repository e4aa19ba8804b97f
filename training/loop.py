"""What every stage's training loop shares: the loss log, the learning-rate schedule, the
resumable state, and the unet stage's ``--minutes`` budget and ``--profile``."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch


class Logger:
    """One JSON line per logged step, to ``<run-dir>/<stage>.log``, and a progress line."""

    def __init__(self, path: Path, total: int, start: int, enabled: bool = True):
        self.file = open(path, "a", buffering=1) if enabled else None  # under torchrun: rank 0's
        self.total, self.t0, self.start = total, time.time(), start

    def log(self, step: int, **values):
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, "time": round(time.time() - self.t0, 1), **values}) + "\n")
        done = step + 1 - self.start
        rate = done / max(time.time() - self.t0, 1e-6)
        eta = (self.total - step - 1) / max(rate, 1e-9)
        vals = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"\r[{step + 1}/{self.total}] {vals} {rate:.2f} it/s eta {eta / 60:.1f} min", end="", file=sys.stderr, flush=True)


def cosine_lr(step: int, total: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_state(path: Path, step: int, modules: dict, optimizer: torch.optim.Optimizer | dict):
    """Resumable training state (tensors and numbers only; loaded with weights_only=True).
    ``modules`` maps names to modules or to their state dicts (gathered whole under FSDP)."""
    state = {"step": step, "optimizer": optimizer if isinstance(optimizer, dict) else optimizer.state_dict(),
             **{k: m if isinstance(m, dict) else m.state_dict() for k, m in modules.items()}}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


class TimeBudget:
    """``--minutes``: fit a stage's schedule to wall-clock time (GPU time that comes by the minute).

    The stage's clock starts when this is made (after model loading and the latent pool); the
    rate is measured over steps ``start + 10`` to ``start + 30`` (the first steps warm up
    kernels and caches). ``fit`` then returns the step count that ends the run in time, when
    that is below the configured one; the cosine schedule is then cut to it. Every
    ``RECHECK`` steps after that the rate is measured again over all steps since the warm-up
    and the schedule is cut further if the run would overrun (it is never lengthened).
    Measured on an H200 (docs/TRAINING.md, "The first GPU legs"): a leg measured 5.8 steps/s
    over the window and then ran at 4.8.
    """

    WARM, MEASURE, RECHECK = 10, 20, 50

    def __init__(self, minutes: float | None, start: int):
        if minutes is not None and not minutes > 0:
            raise SystemExit(f"--minutes must be more than 0, got {minutes}")
        self.seconds = None if minutes is None else 60.0 * minutes
        self.start, self.t0, self.t_warm, self.rate = start, time.time(), None, None

    def fit(self, step: int, total: int) -> int | None:
        if self.seconds is None:
            return None
        if step == self.start + self.WARM:
            self.t_warm = time.time()
        measured = step - self.start - self.WARM
        if measured < self.MEASURE or (self.rate is not None and measured % self.RECHECK):
            return None
        first = self.rate is None
        now = time.time()
        self.rate = measured / max(now - self.t_warm, 1e-6)
        fitted = step + int(self.rate * max(self.seconds - (now - self.t0), 0.0))
        limit = total if first else 0.99 * total - 1  # a re-check cuts only a real overrun
        return max(fitted, step + 1) if fitted < limit else None


class StepProfile:
    """``--profile N``: ``torch.profiler`` over N training steps, from step ``start + 35`` (after
    ``--minutes``' measuring window, so the first fit is not skewed by it; its later re-checks
    see the profiler's overhead spread over all steps so far), and the ops'
    table, sorted by their own time on the device (CPU time on a CPU), written to the run's
    ``profile.txt`` with the wall time per profiled step (the profiler adds some). It says where
    a step's time goes. Measured on an H200 (docs/TRAINING.md, "The first GPU legs"): a
    batch-128 step took ~220 ms, far more than its arithmetic needs."""

    FIRST = 35

    def __init__(self, steps: int | None, start: int, path: Path, device: torch.device):
        if steps is not None and steps < 1:
            raise SystemExit(f"--profile must be at least 1 step, got {steps}")
        self.steps, self.begin, self.path, self.device = steps, start + self.FIRST, path, device
        self.prof, self.t0 = None, 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def at(self, step: int, final: bool = False):
        """Call at the top of every step, and after the loop with its end (final=True): a run that
        ends inside the profiled steps writes what it has."""
        if not self.steps:
            return
        try:  # a profiler that fails (no CUPTI, say) must not cost the training run
            if step == self.begin and not final:
                from torch.profiler import ProfilerActivity, profile
                cuda = self.device.type == "cuda"
                self._sync()
                self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
                self.prof.__enter__()
                self.t0 = time.time()
            elif self.prof is not None and (final or step == self.begin + self.steps):
                self._sync()
                wall = time.time() - self.t0
                prof, self.prof = self.prof, None
                prof.__exit__(None, None, None)
                done = min(step, self.begin + self.steps) - self.begin
                sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
                table = prof.key_averages().table(sort_by=sort, row_limit=40)
                self.path.write_text(f"{done} steps profiled from step {self.begin} on {self.device}: "
                                     f"{wall:.3f} s wall, {wall / max(done, 1):.4f} s per step\n{table}\n")
        except Exception as e:  # noqa: BLE001 - reported in the file and on stderr, training goes on
            self.prof, self.steps = None, None
            self.path.write_text(f"profiling failed: {type(e).__name__}: {e}\n")
            print(f"\n[train unet] --profile: profiling failed ({type(e).__name__}: {e}); training goes on",
                  file=sys.stderr)
