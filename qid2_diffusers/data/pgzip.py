"""A gzip file written on several threads: the ``.nii.gz`` writer of :mod:`~qid2_diffusers.data.io`.

An up-sampled HCP-grid series is 1.6 GB of float32 that barely compresses;
Python's gzip deflates it on one core at a few tens of MB/s, which is
longer than a GPU takes to synthesise it. :class:`ParallelGzipWriter` deflates
fixed-size chunks on a thread pool (zlib releases the GIL), each primed with
the previous chunk's last 32 KiB and ended on a byte boundary, then writes
them in order, as pigz does. The result is ONE standard gzip member whose
decompressed bytes are exactly those written: every reader (nibabel, gzip,
FSL, MRtrix3) sees the same file as from a serial writer, and the size in
the trailer stays the whole stream's, which :func:`~qid2_diffusers.data.io.load_dwi`
checks.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from ..threads import cpu_workers

__all__ = ["ParallelGzipWriter", "CHUNK_BYTES"]

#: Uncompressed bytes per deflate task: large enough that the 32 KiB window
#: lost at each boundary costs nothing measurable, small enough to balance threads.
CHUNK_BYTES = 1 << 24
_WINDOW = 1 << 15


def _deflate(chunk: bytes, level: int, dictionary: bytes) -> bytes:
    if dictionary:
        c = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL, zlib.Z_DEFAULT_STRATEGY,
                             dictionary)
    else:
        c = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(chunk) + c.flush(zlib.Z_SYNC_FLUSH)


class ParallelGzipWriter(io.RawIOBase):
    """A write-only binary file object that gzips into ``fileobj`` on ``workers`` threads.

    Only forward writes: :meth:`seek` accepts the current position (what
    nibabel asks before the image data) and nothing else. Closing it writes
    the end of the stream; ``fileobj`` stays open.

    Args:
        fileobj (binary file object): where the compressed stream goes.
        level (`int`, *optional*, defaults to 1): zlib level (nibabel's default for ``.nii.gz``).
        workers (`int`, *optional*): threads; defaults to :func:`~qid2_diffusers.threads.cpu_workers`.
        chunk_bytes (`int`, *optional*): uncompressed bytes per task; defaults to :data:`CHUNK_BYTES`.
    """

    def __init__(self, fileobj, *, level: int = 1, workers: int | None = None, chunk_bytes: int | None = None):
        super().__init__()
        self.raw = fileobj
        self.level = int(level)
        self.workers = max(1, int(workers or cpu_workers()))
        self.chunk_bytes = int(chunk_bytes or CHUNK_BYTES)
        self.pool = ThreadPoolExecutor(self.workers)
        self.pending = deque()
        self.buffer = bytearray()
        self.previous_tail = b""
        self.crc = 0
        self.size = 0
        # Header: no file name, mtime 0 (reproducible bytes), "fastest" flag at level 1, OS unknown.
        xfl = b"\x04" if self.level == 1 else b"\x02" if self.level == 9 else b"\x00"
        fileobj.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + xfl + b"\xff")

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if (whence, offset) in ((io.SEEK_SET, self.size), (io.SEEK_CUR, 0)):
            return self.size
        raise io.UnsupportedOperation("a gzip stream being written only moves forward by writing")

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        self.buffer += view
        while len(self.buffer) >= self.chunk_bytes:
            self._submit(bytes(self.buffer[: self.chunk_bytes]))
            del self.buffer[: self.chunk_bytes]
        return len(view)

    def _submit(self, chunk: bytes) -> None:
        dictionary, self.previous_tail = self.previous_tail, chunk[-_WINDOW:]
        self.pending.append(self.pool.submit(_deflate, chunk, self.level, dictionary))
        # A bounded queue: at most two chunks per thread held in memory.
        while len(self.pending) > 2 * self.workers:
            self.raw.write(self.pending.popleft().result())

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.buffer:
                self._submit(bytes(self.buffer))
                self.buffer.clear()
            while self.pending:
                self.raw.write(self.pending.popleft().result())
            # The final block (empty), then CRC-32 and size of the uncompressed stream.
            self.raw.write(zlib.compressobj(self.level, zlib.DEFLATED, -zlib.MAX_WBITS).flush(zlib.Z_FINISH))
            self.raw.write(struct.pack("<II", self.crc & 0xFFFFFFFF, self.size & 0xFFFFFFFF))
        finally:
            self.pool.shutdown(cancel_futures=True)
            super().close()
