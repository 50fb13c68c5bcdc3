"""Keep large freed buffers for reuse (glibc only), for processes that move bulk bytes.

Shipping weights allocates and frees several 4 MiB buffers per piece (the read, the protobuf
message, its serialization, gRPC's copy). glibc serves allocations above its mmap threshold
(128 KiB at first) with fresh mmaps and returns them on free, so every piece pays page faults
and page zeroing: measured on the build machine, the coordinator spent 1.3 s of kernel time
per 512 MB shipped, 0.25 s with the thresholds below. Memory stays mapped up to the trim
threshold after a burst; that is the price.

Called from composition roots (`cluster-node up`, `coordinator`), never at import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 << 20
TRIM_THRESHOLD_BYTES = 256 << 20

_done = False


def keep_large_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds; False where that does not apply."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not ok:
        log.info("mallopt refused the buffer thresholds")
        return False
    _done = True
    return True
