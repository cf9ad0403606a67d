"""Where an up-sampling run spends its time: wall seconds per stage.

:func:`~qid2_diffusers.inference.upsample_dwi` fills one dict of stage ->
seconds (:attr:`~qid2_diffusers.inference.UpsampleResult.timings`) and
:meth:`~qid2_diffusers.inference.UpsampleResult.save` adds the write, so
every second of a run sits in exactly one stage and their sum is the run's
wall time. Only ``time.perf_counter`` is read (no device synchronisation):
the sampling stage ends when its results are back on the host anyway.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

__all__ = ["STAGES", "timed", "add_timings", "format_timings"]

#: The stages, in the order a run goes through them.
#: ``read``: the input series into memory; ``mask``: the brain mask (computed or
#: given); ``denoise``: MP-PCA or Patch2Self on the input volumes; ``prior_fit``: the tensor fit of the physics prior, once per shell;
#: ``prior_predict``: its per-slice predictions at the targets; ``adaptation``:
#: test-time adaptation; ``batching``: gathering each batch's slices and storing
#: its results; ``sampling``: the pipeline calls (the network and its pre- and
#: post-processing); ``write``: the output files; ``other``: the rest (planning,
#: allocation, orientation).
STAGES = ("read", "mask", "denoise", "prior_fit", "prior_predict", "adaptation", "batching", "sampling", "write",
          "other")


@contextmanager
def timed(timings: dict | None, stage: str):
    """Add the wall time of the ``with`` block to ``timings[stage]`` (nothing when ``timings`` is `None`)."""
    if timings is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def add_timings(into: dict, timings: dict) -> dict:
    """Add every stage of ``timings`` to ``into``; returns ``into``."""
    for stage, seconds in timings.items():
        into[stage] = into.get(stage, 0.0) + float(seconds)
    return into


def format_timings(timings: dict) -> str:
    """One line: ``timings: read 2.1 s, mask 0.4 s, ...; total 93.0 s`` (stages in :data:`STAGES` order)."""
    order = [s for s in STAGES if s in timings] + sorted(set(timings) - set(STAGES))
    parts = ", ".join(f"{stage.replace('_', ' ')} {timings[stage]:.2f} s" for stage in order)
    return f"timings: {parts}; total {sum(timings.values()):.2f} s"
