"""How many threads the package's own CPU work may use: tensor fits and gzip writes.

The network's threads are torch's (``torch.set_num_threads``). The numpy and
zlib parts run while the network waits (the tensor fit before sampling, the
write after it), so they may use every CPU, unless the user limited threads
with ``OMP_NUM_THREADS``, the variable every numerical library already obeys.
"""

from __future__ import annotations

import os

__all__ = ["cpu_name", "cpu_workers", "z_blocks"]


def cpu_name() -> str:
    """The CPU in words, for benchmark figures: the model name (with family and model numbers, which tell
    generations apart when the name is as vague as ``AMD EPYC``), the architecture and the CPUs this
    process may use, e.g. ``AMD EPYC (family 26, model 2), x86_64, 2 CPUs``. Speed figures differ between
    machines of the same name by 2x and more, so every benchmark prints this."""
    import platform

    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():  # the first CPU's block is enough
                    break
    except OSError:  # not Linux
        pass
    name = fields.get("model name") or platform.processor() or "CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{name}, {platform.machine()}, {cpu_workers()} CPUs"


def cpu_workers() -> int:
    """``OMP_NUM_THREADS`` when set to a positive integer, else the CPUs this process may run on."""
    limit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if limit.isdigit() and int(limit) > 0:
        return int(limit)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def z_blocks(n_slices: int, halo: int, parts: int) -> list[tuple[int, int, int, int]]:
    """Split ``n_slices`` axial slices into ``parts`` contiguous blocks for a local filter of reach ``halo``.

    Returns ``(z0, z1, s0, s1)`` per block: the block owns slices ``z0:z1`` and is filtered over
    ``s0:s1``, its slices plus ``halo`` on either side (cut at the volume's ends, where the whole
    volume's filter sees its boundary too), so every owned slice gets exactly the whole volume's value.
    Blocks are at least ``2 * halo + 1`` thick, so a thin volume is one block.
    """
    parts = max(1, min(int(parts), n_slices // (2 * halo + 1)))
    edges = [round(i * n_slices / parts) for i in range(parts + 1)]
    return [(z0, z1, max(0, z0 - halo), min(n_slices, z1 + halo)) for z0, z1 in zip(edges[:-1], edges[1:])]
