"""How many threads the package's own CPU work may use: tensor fits and gzip writes.

The network's threads are torch's (``torch.set_num_threads``). The numpy and
zlib parts run while the network waits (the tensor fit before sampling, the
write after it), so they may use every CPU, unless the user limited threads
with ``OMP_NUM_THREADS``, the variable every numerical library already obeys.
"""

from __future__ import annotations

import os

__all__ = ["cpu_workers"]


def cpu_workers() -> int:
    """``OMP_NUM_THREADS`` when set to a positive integer, else the CPUs this process may run on."""
    limit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if limit.isdigit() and int(limit) > 0:
        return int(limit)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
