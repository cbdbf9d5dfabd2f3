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

``expandable=True`` (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``; the Note [Expandable Segments] there):

* the same 512-byte rounding and the same small/large pools, but no segment per request: one expandable segment
  per stream and pool (small, large; a graph's private pool has its own), a range of address space that is backed
  ("mapped") in pages of 2 MiB (small pool: kSmallBuffer) or 20 MiB (large pool: kLargeBuffer), its ``segment_size_``;
  kMinLargeAlloc and kRoundLarge play no part (``alloc_block`` calls ``try_allocate_expandable_block`` with the
  rounded request, not ``get_allocation_size``'s);
* reserved = mapped bytes;
* best fit among the free mapped blocks as before, except that a free block followed by unmapped space counts as
  its size plus that space (``get_free_block``'s expandable_size): when a larger free block that ends at a mapped
  neighbour also fits, it is taken, and the tail of the mapped range is kept for growing;
* when no free block fits (``try_allocate_expandable_block``): the lowest-addressed unmapped range of the pool with
  enough room, together with the free mapped block just before it (``find_expandable_block``), is mapped, only the
  shortfall rounded up to whole pages (``map_block``); the mapped pages merge with free neighbours; a new segment is
  reserved only when the pool has none (its address space, 1.125 x the GPU's memory, is never the limit here);
* every split leaves a remainder of at least 512 bytes in both pools (``should_split``): ``memory_allocated`` is the
  sum of the rounded requests, with no unsplit large blocks;
* a freed block merges with free *mapped* neighbours only (``try_merge_blocks``); nothing is unmapped on free;
* ``empty_cache()`` (``release_cached_blocks`` -> ``release_blocks`` -> ``unmap_block``): in every pool but a live
  graph's, each free block gives back the whole pages inside it (``ExpandableSegment::unmap``: from the first page
  boundary at or after its start to the last one at or before its end); the partial pages at its ends stay mapped
  and free, even in segments that still hold tensors; a segment left wholly unmapped is released.

A segment's address is its creation order, a block's the offset inside it (the real allocator compares pointers;
only the ties between equal sizes depend on it).
"""
from __future__ import annotations

import bisect
from qtool.plan.resident import (ALLOC_ROUND_BYTES, LARGE_BUFFER_BYTES, MIN_LARGE_ALLOC_BYTES, ROUND_LARGE_BYTES,
                                 SMALL_ALLOC_BYTES)

SMALL_BUFFER_BYTES = 2 * SMALL_ALLOC_BYTES  # kSmallBuffer: the small pool's segments (expandable: its pages)
EXPANDABLE_ADDRESS_BYTES = 1 << 48  # an expandable segment's address range: more than any GPU maps


class _Segment:
    __slots__ = ("index", "size", "pool", "head", "page", "mapped")

    def __init__(self, index: int, size: int, pool: tuple, page: int = 0):
        self.index, self.size, self.pool, self.head = index, size, pool, None
        self.page = page  # expandable: the mapping granularity; 0: a cudaMalloc segment, mapped whole
        self.mapped = 0 if page else size


class _Block:
    """A block of a segment: a linked list in address order (``prev``/``next``)."""

    __slots__ = ("segment", "offset", "size", "allocated", "prev", "next", "mapped")

    def __init__(self, segment: _Segment, offset: int, size: int, prev=None, next=None, mapped: bool = True):
        self.segment, self.offset, self.size, self.allocated, self.prev, self.next = \
            segment, offset, size, False, prev, next
        self.mapped = mapped

    def key(self) -> tuple[int, int, int]:
        return self.size, self.segment.index, self.offset


def _growable(block: _Block) -> int:
    """get_free_block's expandable_size: a free block's size and the unmapped space right after it."""
    after = block.next
    return block.size + (after.size if after is not None and not after.mapped else 0)


class CachingAllocator:
    """One device's caching allocator. ``malloc(n_bytes, stream)`` returns a handle for ``free``; ``stream`` is any
    label (a CUDA stream, or a graph's private pool: the pool is keyed by it). ``expandable``: the rules of
    ``expandable_segments:True`` (module docstring)."""

    def __init__(self, expandable: bool = False):
        self.expandable = expandable
        self._free: dict[tuple, list[tuple[int, int, int, _Block]]] = {}
        self._unmapped: dict[tuple, list[tuple[int, int, _Block]]] = {}  # expandable: by address
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
            if self.expandable:  # skip a block that could grow in place when a larger one fits as it is
                while i + 1 < len(free) and _growable(free[i + 1][3]) < _growable(free[i][3]):
                    i += 1
            block = free.pop(i)[3]
        elif self.expandable:
            block = self._grow(pool, size)
        else:
            rounded = -(-size // ROUND_LARGE_BYTES) * ROUND_LARGE_BYTES
            block = self._new_segment(pool, SMALL_BUFFER_BYTES if small else LARGE_BUFFER_BYTES
                                      if size < MIN_LARGE_ALLOC_BYTES else rounded)
        remaining = block.size - size
        if remaining >= ALLOC_ROUND_BYTES if small or self.expandable else remaining > SMALL_ALLOC_BYTES:
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
        for other in (block.prev, block.next):  # merge with free (mapped) neighbours of the segment
            if other is not None and not other.allocated and other.mapped:
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
        """``torch.cuda.empty_cache()``: return every wholly free segment (expandable: unmap every whole free page),
        except in the pools keyed by a stream in ``keep`` (a live CUDA graph's private pool)."""
        if self.expandable:
            for pool, free in self._free.items():
                if pool[0] not in keep:
                    for *_, block in list(free):
                        self._unmap(block)
            for segment in [s for s in self._segments if s.head.next is None and not s.head.mapped]:
                self._unmapped_remove(segment.head)
                self._segments.remove(segment)
            return
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
        """Reserved (mapped) bytes in the segments of ``stream``'s pools."""
        return sum(s.mapped for s in self._segments if s.pool[0] == stream)

    def segments(self, stream) -> list[tuple[bool, int]]:
        """(small pool, reserved bytes) of each segment of ``stream``'s pools, in creation order."""
        return [(s.pool[1], s.mapped) for s in self._segments if s.pool[0] == stream]

    # --- internals ----------------------------------------------------------------------------------------------
    def _new_segment(self, pool: tuple, size: int) -> _Block:
        self._n_segments += 1
        segment = _Segment(self._n_segments, size, pool)
        segment.head = _Block(segment, 0, size)
        self._segments.append(segment)
        self.reserved_bytes += size
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        return segment.head

    def _grow(self, pool: tuple, size: int) -> _Block:
        """try_allocate_expandable_block: map what a ``size`` request lacks at the lowest address that has room."""
        candidate = None
        for *_, gap in self._unmapped.get(pool, []):  # find_expandable_block
            start = gap.prev if gap.prev is not None and not gap.prev.allocated else gap
            room, block = 0, start
            while room < size and block is not None and not block.allocated:
                room, block = room + block.size, block.next
            if room >= size:
                candidate = start
                break
        if candidate is None:  # the pool's first segment (or its last was released): address space only
            self._n_segments += 1
            segment = _Segment(self._n_segments, EXPANDABLE_ADDRESS_BYTES, pool,
                               page=SMALL_BUFFER_BYTES if pool[1] else LARGE_BUFFER_BYTES)
            candidate = segment.head = _Block(segment, 0, EXPANDABLE_ADDRESS_BYTES, mapped=False)
            self._segments.append(segment)
            self._unmapped_insert(candidate)
        if not candidate.mapped:
            candidate = self._map(candidate, min(candidate.size, size))
        while candidate.size < size:  # a free block, then unmapped space: map the shortfall, which merges with it
            candidate = self._map(candidate.next, min(size - candidate.size, candidate.next.size))
        self._remove(candidate)
        return candidate

    def _map(self, block: _Block, n_bytes: int) -> _Block:
        """map_block: back the first ``n_bytes`` of unmapped ``block``, in whole pages; merge with free neighbours."""
        segment = block.segment
        pages = min(block.size, -(-n_bytes // segment.page) * segment.page)
        self._unmapped_remove(block)
        if pages < block.size:
            rest = _Block(segment, block.offset + pages, block.size - pages, prev=block, next=block.next,
                          mapped=False)
            if block.next:
                block.next.prev = rest
            block.next, block.size = rest, pages
            self._unmapped_insert(rest)
        block.mapped = True
        segment.mapped += pages
        self.reserved_bytes += pages
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        if block.prev is not None and block.prev.mapped and not block.prev.allocated:
            self._remove(block.prev)
            block = self._join(block.prev, block)
        if block.next is not None and block.next.mapped and not block.next.allocated:
            self._remove(block.next)
            block = self._join(block, block.next)
        self._insert(block)
        return block

    def _unmap(self, block: _Block) -> None:
        """unmap_block: give back the whole pages inside free ``block``; the partial pages at its ends stay free."""
        segment, page = block.segment, block.segment.page
        start, end = -(-block.offset // page) * page, (block.offset + block.size) // page * page
        if start >= end:
            return
        self._remove(block)
        if end < block.offset + block.size:
            after = _Block(segment, end, block.offset + block.size - end, prev=block, next=block.next)
            if block.next:
                block.next.prev = after
            block.next = after
            self._insert(after)
        if start > block.offset:
            before = _Block(segment, block.offset, start - block.offset, prev=block.prev, next=block)
            if block.prev:
                block.prev.next = before
            elif segment.head is block:
                segment.head = before
            block.prev = before
            self._insert(before)
        block.offset, block.size, block.mapped = start, end - start, False
        segment.mapped -= end - start
        self.reserved_bytes -= end - start
        if block.prev is not None and not block.prev.mapped:
            self._unmapped_remove(block.prev)
            block = self._join(block.prev, block)
        if block.next is not None and not block.next.mapped:
            self._unmapped_remove(block.next)
            block = self._join(block, block.next)
        self._unmapped_insert(block)

    @staticmethod
    def _join(first: _Block, second: _Block) -> _Block:
        """Merge ``second`` into its predecessor ``first`` (both out of the free and unmapped lists)."""
        first.size += second.size
        first.next = second.next
        if second.next:
            second.next.prev = first
        return first

    def _insert(self, block: _Block) -> None:
        bisect.insort(self._free.setdefault(block.segment.pool, []), (*block.key(), block))

    def _remove(self, block: _Block) -> None:
        free = self._free[block.segment.pool]
        i = bisect.bisect_left(free, block.key())
        assert free[i][3] is block
        free.pop(i)

    def _unmapped_insert(self, block: _Block) -> None:
        bisect.insort(self._unmapped.setdefault(block.segment.pool, []), (block.segment.index, block.offset, block))

    def _unmapped_remove(self, block: _Block) -> None:
        gaps = self._unmapped[block.segment.pool]
        i = bisect.bisect_left(gaps, (block.segment.index, block.offset))
        assert gaps[i][2] is block
        gaps.pop(i)
