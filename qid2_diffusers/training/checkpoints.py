"""Checkpoints of a run: its progress (:class:`RunState`), saving, listing and
resuming ``checkpoint-<step>`` folders, and the wall-time budget across resumes.

A checkpoint is ``accelerator.save_state``: the prepared models, optimisers,
LR schedulers, RNG states, and the objects registered for checkpointing (the
:class:`RunState`, then the EMA weights when there are any).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import torch

from ..errors import QID2InputError

__all__ = ["RunState", "Clock", "checkpoints", "save_checkpoint", "resume"]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunState:
    """Progress saved with every checkpoint: steps, wall time spent, last validation."""

    def __init__(self):
        self.global_step = 0
        self.elapsed_seconds = 0.0
        self.validation: dict = {}

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "elapsed_seconds": self.elapsed_seconds, "validation": self.validation}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])
        self.elapsed_seconds = float(state["elapsed_seconds"])
        self.validation = dict(state.get("validation", {}))


def checkpoints(output_dir) -> list[Path]:
    """Complete checkpoint folders, oldest first (half-written ones have a temporary name)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator, args, global_step: int) -> Path:
    """``accelerator.save_state`` into ``output_dir/checkpoint-<step>``, written under a temporary name and renamed.

    Beyond ``--checkpoints_total_limit``, the oldest checkpoints are removed first.
    """
    final = Path(args.output_dir) / f"checkpoint-{global_step}"
    tmp = Path(args.output_dir) / f".checkpoint-{global_step}.tmp"
    if accelerator.is_main_process:
        # Left by a run killed while saving.
        for stale in Path(args.output_dir).glob(".checkpoint-*.tmp"):
            shutil.rmtree(stale)
        existing = [p for p in checkpoints(args.output_dir) if p != final]
        if args.checkpoints_total_limit is not None and len(existing) >= args.checkpoints_total_limit:
            for old in existing[: len(existing) - args.checkpoints_total_limit + 1]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, args, state: RunState) -> int:
    """Load ``--resume_from_checkpoint`` (``latest`` or a folder) into the prepared objects; the step to continue from."""
    if not args.resume_from_checkpoint:
        return 0
    if args.resume_from_checkpoint == "latest":
        found = checkpoints(args.output_dir)
        if not found:
            accelerator.print(f"no checkpoint in {args.output_dir}; starting a new run")
            return 0
        path = found[-1]
    else:
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir():
            raise QID2InputError(path, "checkpoint folder not found")
    accelerator.print(f"resuming from {path}")
    accelerator.load_state(str(path))
    return state.global_step


class Clock:
    """Wall time of this run plus what resumed checkpoints had already spent."""

    def __init__(self, state: RunState):
        self.state = state
        self.base = state.elapsed_seconds
        self.start = time.monotonic()

    def update(self) -> float:
        self.state.elapsed_seconds = self.base + time.monotonic() - self.start
        return self.state.elapsed_seconds

    def out_of_time(self, accelerator, budget_minutes) -> bool:
        """Whether the budget is spent; decided by the main process, so every process stops on the same step."""
        if budget_minutes is None:
            return False
        from accelerate.utils import broadcast

        flag = torch.tensor([float(self.update() >= budget_minutes * 60.0)], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = broadcast(flag, from_process=0)
        return bool(flag.item())
