"""Reading a checkpoint ahead of the converter: a background thread asks the kernel to read the input shards'
byte ranges in order, a bounded window ahead of what has been consumed, and drops behind what it brought in. The
pages go to the page cache, never to the converting process's memory."""
from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections import deque
from pathlib import Path

import numpy as np


class Readahead:
    """Asks the kernel, from a background thread, to read byte ranges of files in order, staying at most
    ``window_bytes`` ahead of what the caller has consumed (``advance``). Disk reads then overlap with whatever the
    caller does meanwhile (imports, building the meta model, quantising). The pages go to the page cache, not to this
    process's memory, so they do not count towards its RSS. A no-op where ``posix_fadvise`` does not exist.

    With ``drop_behind``, pages that this read brought into the page cache are dropped again once consumed (the
    caller must have unmapped them: :meth:`qtool.format.safetensors.SafetensorsFile.release`): a chunk none of whose pages were cached before
    is dropped when the caller has passed it, one that was (partly) cached is left alone. So a conversion leaves the
    page cache as it found it instead of filling it with a checkpoint that is read once, and its own allocations
    (output pages, the readahead itself) reuse the memory it frees. On a VM whose host takes back free guest memory,
    touching fresh memory costs a host page fault per 4 KiB page (~5 us measured here): drop-behind made a cold
    9.4 GB conversion ~20% faster.

        with Readahead([(path, begin, end), ...]) as ra:
            ...; ra.advance(nbytes)
    """

    def __init__(self, ranges: list[tuple[Path, int, int]], window_bytes: int = 2 * 2**30,
                 chunk_bytes: int | None = None, drop_behind: bool = True, queue_bytes: int = 64 * 2**20):
        self.ranges = list(ranges)
        self.window_bytes = window_bytes
        self.queue_bytes = queue_bytes  # reads queued at the disk at once, at most (beyond one chunk)
        self.chunk_bytes = chunk_bytes  # None: the device's readahead size, see device_readahead_bytes
        self.drop_behind = drop_behind
        self._consumed = 0
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="qtool-readahead", daemon=True)

    def __enter__(self) -> "Readahead":
        if hasattr(os, "posix_fadvise"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def advance(self, nbytes: int) -> None:
        with self._cond:
            self._consumed += nbytes
            self._cond.notify()

    def _run(self) -> None:
        issued = 0
        behind: deque[tuple[int, int, int, int]] = deque()  # chunks to drop: (fd, offset, n, bytes issued up to it)
        queued: deque[tuple[int, int, int]] = deque()  # chunks maybe still being read: (fd, last byte, n)
        fds: list[int] = []
        try:
            for path, begin, end in self.ranges:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    return  # read errors surface where the data is used
                fds.append(fd)
                chunk = self.chunk_bytes or device_readahead_bytes(path)
                for offset in range(begin, end, chunk):
                    if not self._wait(lambda: issued - self._consumed < self.window_bytes, behind):
                        return
                    n = min(chunk, end - offset)
                    cold = self.drop_behind and not any_page_cached(fd, offset, n)
                    os.posix_fadvise(fd, offset, n, os.POSIX_FADV_WILLNEED)  # queues the reads, returns at once
                    issued += n
                    if cold:
                        behind.append((fd, offset, n, issued))
                    queued.append((fd, offset + n - 1, n))
                    while sum(q[2] for q in queued) > self.queue_bytes:
                        # Keep at most queue_bytes of reads queued at the disk: queued all at once, the 2 GiB window
                        # made every other read wait behind it (the imports of `select`: 1.6 s -> 2.6 s). Reading
                        # the last byte of an old chunk waits until the disk has got that far.
                        q_fd, q_last, _ = queued.popleft()
                        os.pread(q_fd, 1, q_last)
            self._wait(lambda: False, behind)  # all issued: keep dropping behind the caller until it is done
        except OSError:
            return
        finally:
            for fd in fds:
                os.close(fd)

    def _wait(self, ready, behind: deque) -> bool:
        """Wait until ``ready()`` (True) or the end (False), dropping the chunks the caller has passed meanwhile."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or ready() or (behind and behind[0][3] <= self._consumed))
                stopped, consumed = self._stopped, self._consumed
            while behind and behind[0][3] <= consumed:
                fd, offset, n, _ = behind.popleft()
                os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
            if stopped:
                return False
            if ready():
                return True


def any_page_cached(fd: int, offset: int, n: int) -> bool:
    """Whether any page of bytes ``[offset, offset + n)`` of the open file ``fd`` is in the page cache (``mincore``
    on a short-lived mapping, which reads nothing). True where that cannot be told, so that nothing is dropped that
    may have been cached."""
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        with mmap.mmap(fd, offset + n - start, offset=start, access=mmap.ACCESS_READ) as mm:
            view = np.frombuffer(mm, np.uint8)
            vec = np.zeros(-(-len(mm) // mmap.PAGESIZE), np.uint8)
            ok = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(len(mm)),
                              ctypes.c_void_p(vec.ctypes.data)) == 0
            del view  # the mapping cannot close while a view of it exists
        return not ok or bool((vec & 1).any())
    except (OSError, ValueError, AttributeError):
        return True


def device_readahead_bytes(path: Path) -> int:
    """The most that one ``POSIX_FADV_WILLNEED`` call on ``path`` reads. Linux clamps each call to the larger of the
    device's ``read_ahead_kb`` and ``max_sectors_kb`` (mm/readahead.c, ``force_page_cache_ra``) and drops the rest
    of the range without a word: 32 MiB calls on a device with 8 MiB readahead left 3/4 of the input to be read by
    page faults, in the converting threads. 128 KiB (the kernel's default readahead) where sysfs does not say."""
    try:
        st = os.stat(path)
        dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
        queue = dev / "queue" if (dev / "queue").is_dir() else dev.parent / "queue"  # a partition: its disk's queue
        kib = max(int((queue / name).read_text()) for name in ("read_ahead_kb", "max_sectors_kb"))
    except (OSError, ValueError):
        kib = 128
    return min(max(kib, 128), 32 * 1024) * 1024
