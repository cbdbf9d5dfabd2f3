"""PyTorch's CUDA caching allocator, replayed in pure Python: what ``memory_reserved`` becomes for a sequence of
allocations and frees. Rules from c10/cuda/CUDACachingAllocator.cpp (torch 2.11, no PYTORCH_CUDA_ALLOC_CONF):

* every request is rounded up to 512 bytes (kMinBlockSize);
* requests up to 1 MiB (kSmallSize) come from the small pool, whose segments are 2 MiB (kSmallBuffer); larger ones
  from the large pool, whose new segments are 20 MiB (kLargeBuffer) for requests under 10 MiB (kMinLargeAlloc) and
  the request rounded up to 2 MiB (kRoundLarge) otherwise;
* a cached block is reused only by a request on the same stream and in the same pool (a CUDA graph's private pool is
  a pool of its own): the smallest free block that holds the request (best fit; ties by address);
* a block is split when the remainder is at least 512 bytes (small pool) or more than 1 MiB (large pool); otherwise
  the whole block is handed out, and ``memory_allocated`` counts all of it;
* a freed block merges with free neighbours of its segment; ``empty_cache()`` returns every segment that is one free
  block to CUDA; nothing else is ever returned (the cache keeps a peak's segments).

A segment's address is its creation order, a block's the offset inside it (the real allocator compares pointers;
only the ties between equal sizes depend on it).
"""
from __future__ import annotations

import bisect
from qtool.plan.resident import (ALLOC_ROUND_BYTES, LARGE_BUFFER_BYTES, MIN_LARGE_ALLOC_BYTES, ROUND_LARGE_BYTES,
                                 SMALL_ALLOC_BYTES)

SMALL_BUFFER_BYTES = 2 * SMALL_ALLOC_BYTES  # kSmallBuffer: the small pool's segments


class _Segment:
    __slots__ = ("index", "size", "pool", "head")

    def __init__(self, index: int, size: int, pool: tuple):
        self.index, self.size, self.pool, self.head = index, size, pool, None


class _Block:
    """A block of a segment: a linked list in address order (``prev``/``next``)."""

    __slots__ = ("segment", "offset", "size", "allocated", "prev", "next")

    def __init__(self, segment: _Segment, offset: int, size: int, prev=None, next=None):
        self.segment, self.offset, self.size, self.allocated, self.prev, self.next = \
            segment, offset, size, False, prev, next

    def key(self) -> tuple[int, int, int]:
        return self.size, self.segment.index, self.offset


class CachingAllocator:
    """One device's caching allocator. ``malloc(n_bytes, stream)`` returns a handle for ``free``; ``stream`` is any
    label (a CUDA stream, or a graph's private pool: the pool is keyed by it)."""

    def __init__(self):
        self._free: dict[tuple, list[tuple[int, int, int, _Block]]] = {}
        self._segments: list[_Segment] = []
        self._n_segments = 0
        self.allocated_bytes = self.reserved_bytes = 0
        self.peak_allocated_bytes = self.peak_reserved_bytes = 0

    # --- the two calls --------------------------------------------------------------------------------------
    def malloc(self, n_bytes: int, stream="default") -> _Block:
        size = max(ALLOC_ROUND_BYTES, -(-n_bytes // ALLOC_ROUND_BYTES) * ALLOC_ROUND_BYTES)
        small = size <= SMALL_ALLOC_BYTES
        pool = (stream, small)
        free = self._free.setdefault(pool, [])
        i = bisect.bisect_left(free, (size, -1, -1))
        if i < len(free):
            block = free.pop(i)[3]
        else:
            rounded = -(-size // ROUND_LARGE_BYTES) * ROUND_LARGE_BYTES
            block = self._new_segment(pool, SMALL_BUFFER_BYTES if small else LARGE_BUFFER_BYTES
                                      if size < MIN_LARGE_ALLOC_BYTES else rounded)
        remaining = block.size - size
        if remaining >= ALLOC_ROUND_BYTES if small else remaining > SMALL_ALLOC_BYTES:
            rest = _Block(block.segment, block.offset + size, remaining, prev=block, next=block.next)
            if block.next:
                block.next.prev = rest
            block.next, block.size = rest, size
            self._insert(rest)
        block.allocated = True
        self.allocated_bytes += block.size
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)
        return block

    def free(self, block: _Block) -> None:
        assert block.allocated, "double free"
        block.allocated = False
        self.allocated_bytes -= block.size
        for other in (block.prev, block.next):  # merge with free neighbours of the segment
            if other is not None and not other.allocated:
                self._remove(other)
                if other is block.prev:
                    other.size += block.size
                    other.next = block.next
                    if block.next:
                        block.next.prev = other
                    block = other
                else:
                    block.size += other.size
                    block.next = other.next
                    if other.next:
                        other.next.prev = block
        self._insert(block)

    # --- whole-cache operations -------------------------------------------------------------------------------
    def empty_cache(self, keep=()) -> None:
        """``torch.cuda.empty_cache()``: return every wholly free segment, except those of the pools keyed by a
        stream in ``keep`` (a live CUDA graph's private pool)."""
        for segment in list(self._segments):
            block = segment.head
            if segment.pool[0] not in keep and not block.allocated and block.next is None:
                self._remove(block)
                self._segments.remove(segment)
                self.reserved_bytes -= segment.size

    def reset_peaks(self) -> None:
        """``torch.cuda.reset_peak_memory_stats()``: the peaks restart from the current values."""
        self.peak_allocated_bytes, self.peak_reserved_bytes = self.allocated_bytes, self.reserved_bytes

    def segment_bytes(self, stream) -> int:
        """Reserved bytes in the segments of ``stream``'s pools."""
        return sum(s.size for s in self._segments if s.pool[0] == stream)

    # --- internals ----------------------------------------------------------------------------------------------
    def _new_segment(self, pool: tuple, size: int) -> _Block:
        self._n_segments += 1
        segment = _Segment(self._n_segments, size, pool)
        segment.head = _Block(segment, 0, size)
        self._segments.append(segment)
        self.reserved_bytes += size
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        return segment.head

    def _insert(self, block: _Block) -> None:
        bisect.insort(self._free.setdefault(block.segment.pool, []), (*block.key(), block))

    def _remove(self, block: _Block) -> None:
        free = self._free[block.segment.pool]
        i = bisect.bisect_left(free, block.key())
        assert free[i][3] is block
        free.pop(i)
