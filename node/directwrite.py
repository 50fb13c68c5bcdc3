"""Direct (O_DIRECT) writes that overlap the device with the caller.

A received piece is copied into a page-aligned buffer and written with O_DIRECT from there
(node/weightcache.py says why). Waiting for the device is not CPU work, so the write runs on a
disk thread while the caller copies the next piece into another buffer: a few buffers in
turn, a new piece waiting only when all of them are still being written. One disk thread
writes in the order pieces were queued, so a file never has a hole before its last finished
write (a node killed mid-transfer resumes from the file's size).

Used from one thread (the node's weights thread); `settle()` before a file is closed,
verified or read back.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

BUFFER_BYTES = 4 << 20
BUFFERS = 3


@dataclass(frozen=True)
class _Queued:
    done: Future[None]
    buf: mmap.mmap
    n: int
    dfd: int
    fd: int  # the page-cache descriptor of the same file, for a refused direct write
    pos: int
    refused: Callable[[], None]


class DirectWriter:
    def __init__(self, buffers: int = BUFFERS, buffer_bytes: int = BUFFER_BYTES) -> None:
        if buffers < 1 or buffer_bytes < mmap.PAGESIZE or buffer_bytes % mmap.PAGESIZE:
            raise ValueError("need at least one buffer of whole pages")
        self.buffer_bytes = buffer_bytes
        self._buffers = buffers
        self._free: list[mmap.mmap] = []
        self._made = 0
        self._queued: deque[_Queued] = deque()
        self._disk: ThreadPoolExecutor | None = None

    def write(
        self, dfd: int, fd: int, data: memoryview, pos: int, refused: Callable[[], None]
    ) -> None:
        """Queue data (whole blocks) to be written at pos through dfd (opened O_DIRECT). A
        write the kernel refuses is redone through fd (the page cache) when it settles, and
        `refused` is called so the caller stops queueing direct writes for that file."""
        done = 0
        while done < len(data):
            buf = self._take()
            n = min(len(buf), len(data) - done)
            _copy_into(buf, data[done : done + n])
            if self._disk is None:
                self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disk")
            future = self._disk.submit(_pwrite_all, dfd, memoryview(buf)[:n], pos + done)
            self._queued.append(_Queued(future, buf, n, dfd, fd, pos + done, refused))
            done += n

    def settle(self, dfd: int | None = None) -> None:
        """Wait until every queued write is on its file (or redone through the page cache);
        with `dfd`, only until those of that descriptor are (and the ones queued before them),
        so one file can be closed while the next one's pieces are still being written."""
        if dfd is None:
            last = len(self._queued)
        else:
            last = max((i + 1 for i, q in enumerate(self._queued) if q.dfd == dfd), default=0)
        for _ in range(last):
            self._free.append(self._finish(self._queued.popleft()))

    def close(self) -> None:
        self.settle()
        if self._disk is not None:
            self._disk.shutdown(wait=True)
            self._disk = None
        self._free.clear()  # unmapped once unreferenced (a failed write's traceback may hold one)
        self._made = 0

    def _take(self) -> mmap.mmap:
        if self._free:
            return self._free.pop()
        if self._made < self._buffers:
            self._made += 1
            return mmap.mmap(-1, self.buffer_bytes)
        return self._finish(self._queued.popleft())

    @staticmethod
    def _finish(q: _Queued) -> mmap.mmap:
        try:
            q.done.result()
        except OSError as e:  # direct I/O refused after all: the page cache it is
            log.info("direct writes refused (%s); writing through the page cache", e)
            q.refused()
            _pwrite_all(q.fd, memoryview(q.buf)[: q.n], q.pos)
        return q.buf


def _copy_into(dst: mmap.mmap, src: memoryview) -> None:
    """dst[:len(src)] = src, without holding the GIL (ctypes releases it around the foreign
    call), so the event loop keeps receiving while megabytes are copied."""
    n = len(src)
    if not n:
        return
    target = (ctypes.c_char * n).from_buffer(dst)
    try:
        ctypes.memmove(target, np.frombuffer(src, dtype=np.uint8).ctypes.data, n)
    finally:
        del target


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], pos + done)
