"""safetensors files without trust: a validating header reader, zero-copy tensor views, and a streaming writer.

File format (https://huggingface.co/docs/safetensors): 8-byte little-endian header length N, N bytes of UTF-8 JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the data section;
offsets are relative to the data section and, as the safetensors library requires, tile it exactly: in order of
offsets, each tensor begins where the previous one ends, the first at 0, the last at the end of the file.

The writer places every tensor at an offset fixed before any data is written, so outputs stream to disk tensor by
tensor: tensors are grouped by element size (8, 4, 2 then 1 byte, as the safetensors library orders them, which
keeps every tensor aligned for a zero-copy ``view(dtype)``), and tensors whose size is only known at the end
(``tail`` entries: the quant-state JSON blobs) go last. The header is written into a space reserved up front and
padded with spaces, which the format allows.
"""
from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtool.errors import InputError, OutputError

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library refuses larger headers too

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class SafetensorsFile:
    """A validated safetensors file: its tensors in file order, metadata, and a lazily opened read-only mmap."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    _mm: mmap.mmap | None = field(default=None, repr=False)
    _fd: int | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # the lazy open, from any thread

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy, read-only view of the tensor (valid while the file is open)."""
        info = self.tensors[name]
        with self._lock:
            if self._mm is None:
                self._fd = os.open(self.path, os.O_RDONLY)
                self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        buf = memoryview(self._mm)[info.begin:info.end]
        import warnings

        with warnings.catch_warnings():  # the buffer is read-only; we never write through these views
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(buf, dtype=torch.uint8)
        if info.begin % flat.new_empty(0, dtype=info.dtype).element_size():
            flat = flat.clone()  # misaligned in a foreign file: copy rather than fail the dtype view
        return flat.view(info.dtype).reshape(info.shape)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's bytes now (overlaps disk reads with compute)."""
        info = self.tensors[name]
        if hasattr(os, "posix_fadvise") and info.nbytes:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, info.begin, info.nbytes, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    @property
    def data_range(self) -> tuple[int, int]:
        """(first, end) absolute byte offsets of the tensor data in the file."""
        spans = [(t.begin, t.end) for t in self.tensors.values() if t.nbytes]
        return (min(b for b, _ in spans), max(e for _, e in spans)) if spans else (0, 0)

    def release(self, name: str) -> None:
        """Drop a processed tensor's pages from this process (keeps RSS bounded while streaming)."""
        info = self.tensors[name]
        if self._mm is not None and info.nbytes and hasattr(self._mm, "madvise"):
            page = mmap.PAGESIZE
            start = info.begin // page * page
            self._mm.madvise(mmap.MADV_DONTNEED, start, info.end - start)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # tensor views are still alive (e.g. in an exception's traceback): they keep the
                pass  # mapping until they go; closing must not mask the error being raised
            os.close(self._fd)
            self._mm = self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def read_header(path: str | Path) -> SafetensorsFile:
    """Read and validate a safetensors header. Every problem raises InputError naming the file (and tensor)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: truncated file ({size} bytes; a safetensors file starts with an 8-byte "
                                 "header length)", hint="the download or copy was interrupted; fetch the file again")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise InputError(f"{path}: header length {n:,} bytes is beyond the 100 MiB safetensors limit",
                                 hint="this is not a safetensors file, or it is corrupt")
            if 8 + n > size:
                raise InputError(f"{path}: header length {n:,} bytes runs beyond the end of the file ({size:,} bytes)",
                                 hint="the file is truncated; fetch it again")
            raw = f.read(n)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: header is not valid JSON ({exc})", hint="the file is corrupt; fetch it again") from exc
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: __metadata__ is not an object")
    data_start = 8 + n
    data_len = size - data_start
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise InputError(f"{path}: tensor {name!r} has a malformed header entry: {entry!r}")
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise InputError(f"{path}: tensor {name!r} has unknown dtype {entry['dtype']!r}",
                             hint=f"qtool reads {', '.join(DTYPES)}")
        shape, offs = entry["shape"], entry["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)):
            raise InputError(f"{path}: tensor {name!r} has an invalid shape or data_offsets: {entry!r}")
        begin, end = offs
        if not 0 <= begin <= end <= data_len:
            raise InputError(f"{path}: tensor {name!r} data_offsets [{begin}, {end}] fall outside the data section "
                             f"({data_len:,} bytes)", hint="the file is truncated or corrupt; fetch it again")
        if end - begin != math.prod(shape) * _element_size(dtype):
            raise InputError(f"{path}: tensor {name!r} has {end - begin} bytes of data but shape {shape} "
                             f"{entry['dtype']} needs {math.prod(shape) * _element_size(dtype)}")
        tensors.append(TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end))
    _check_contiguous(path, tensors, data_start, data_len)
    return SafetensorsFile(path, {t.name: t for t in tensors}, {str(k): str(v) for k, v in metadata.items()})


def _check_contiguous(path: Path, tensors: list[TensorInfo], data_start: int, data_len: int) -> None:
    """The safetensors library's rule (``Metadata::validate`` and ``read_metadata``): in order of offsets, each tensor
    begins where the previous one ends (the first at 0) and the last ends at the end of the file. So no two tensors
    share bytes and no byte belongs to none. Sorts ``tensors`` by offset."""
    tensors.sort(key=lambda t: (t.begin, t.end))
    end, prev = data_start, None
    for t in tensors:
        if t.begin < end:
            raise InputError(f"{path}: tensors {prev.name!r} and {t.name!r} overlap in the data section (bytes "
                             f"{t.begin - data_start:,}..{min(end, t.end) - data_start:,})",
                             hint="the file is corrupt; fetch it again")
        if t.begin > end:
            where = f"between {prev.name!r} and {t.name!r}" if prev else f"before the first tensor {t.name!r}"
            raise InputError(f"{path}: bytes {end - data_start:,}..{t.begin - data_start:,} of the data section belong "
                             f"to no tensor ({where}); safetensors data must be contiguous",
                             hint="the file is corrupt or was not written by a safetensors library; fetch it again")
        end, prev = t.end, t
    if end != data_start + data_len:
        raise InputError(f"{path}: {data_start + data_len - end:,} bytes after the last tensor"
                         f"{f' {prev.name!r}' if prev else ''} belong to no tensor; safetensors data must end with "
                         "the file", hint="the file is corrupt or has data appended; fetch it again")


# ----------------------------------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class Slot:
    """A tensor the writer will receive: fixed size (``dtype``, ``shape``) or a ``tail`` entry sized at the end."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    tail: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _element_size(self.dtype)


class ShardWriter:
    """Writes one safetensors file to ``path`` from a plan of slots, accepting tensors in any order, from any thread.

    Fixed slots are placed up front (grouped by element size, largest first) and written as they come; tail slots
    (a few hundred bytes each) are kept until ``close()``, which appends them in plan order, so that the file does not
    depend on the order of arrival, writes the header and checks that every slot was filled. The caller renames the
    folder into place.
    """

    def __init__(self, path: Path, slots: list[Slot], metadata: dict[str, str] | None = None, max_tail_bytes: int = 512):
        self.path = Path(path)
        self.metadata = {"format": "pt", **(metadata or {})}
        fixed = sorted((s for s in slots if not s.tail), key=lambda s: -_element_size(s.dtype))
        self.tails = {s.name: s for s in slots if s.tail}
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for s in fixed:
            self.offsets[s.name] = (pos, pos + s.nbytes)
            pos += s.nbytes
        self.fixed_end = pos
        self.slots = {s.name: s for s in slots}
        self.tail_data: dict[str, tuple[bytes, tuple[int, ...]]] = {}  # name -> (bytes, shape), written by close()
        self.filled: set[str] = set()
        # reserve header room for the worst case: every tail at max_tail_bytes, offsets as long as they can be
        worst = {s.name: {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape) if not s.tail else [max_tail_bytes],
                          "data_offsets": [10**15, 10**15]} for s in slots}
        worst["__metadata__"] = self.metadata
        self.header_room = (len(json.dumps(worst, separators=(",", ":")).encode()) + 64 + 7) // 8 * 8
        self.data_start = 8 + self.header_room
        self.max_tail_bytes = max_tail_bytes
        self._lock = threading.Lock()  # guards the bookkeeping
        # One write at a time: the kernel serialises writes to a file anyway (the inode lock), but a writer waiting
        # for it there spins on the CPU while the other copies (rwsem_spin_on_owner: ~2% of a conversion's CPU time
        # with two writers); waiting on this lock, it sleeps.
        self._write_lock = threading.Lock()
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create {self.path}: {exc.strerror}") from exc

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self.slots.get(name)
        t = tensor.detach().cpu().contiguous()
        if slot is not None and (t.dtype != slot.dtype or (not slot.tail and tuple(t.shape) != slot.shape)):
            raise AssertionError(f"writer: {name!r} is {t.dtype} {tuple(t.shape)}, planned {slot.dtype} {slot.shape}")
        data = t.view(-1).view(torch.uint8).numpy() if t.numel() else b""
        with self._lock:
            if slot is None or name in self.filled:
                raise AssertionError(f"writer: unexpected or repeated tensor {name!r}")
            if slot.tail and len(data) > self.max_tail_bytes:
                raise AssertionError(f"writer: tail tensor {name!r} exceeds {self.max_tail_bytes} bytes")
            self.filled.add(name)
        if slot.tail:
            self.tail_data[name] = (bytes(data), tuple(t.shape))
            return
        with self._write_lock:
            _pwrite_all(self.fd, memoryview(data).cast("B") if len(data) else b"", self.data_start + self.offsets[name][0],
                        self.path)

    def copy_from(self, name: str, src: Path, src_offset: int, nbytes: int) -> None:
        """Fill fixed slot ``name`` with ``nbytes`` bytes of file ``src`` at ``src_offset``, copied by the kernel
        (``copy_file_range``: from page cache to page cache, or a reflink where the file system shares blocks), so
        that a tensor copied unchanged never passes through this process's memory."""
        slot = self.slots.get(name)
        with self._lock:
            if slot is None or slot.tail or name in self.filled:
                raise AssertionError(f"writer: unexpected, tail or repeated tensor {name!r}")
            if nbytes != slot.nbytes:
                raise AssertionError(f"writer: {name!r} is {nbytes} bytes, planned {slot.nbytes}")
            self.filled.add(name)
        with self._write_lock:
            _copy_range(Path(src), src_offset, self.fd, self.data_start + self.offsets[name][0], nbytes, self.path)

    def close(self, sync: bool = True) -> int:
        """Write the header; return the file size. Raises AssertionError if a planned tensor never arrived.
        ``sync=False`` leaves the fsync to the caller (which may do it in the background)."""
        missing = set(self.slots) - self.filled
        if missing:
            raise AssertionError(f"writer: {len(missing)} planned tensors were never written, e.g. {sorted(missing)[:3]}")
        pos, tails = self.fixed_end, bytearray()
        for name in self.tails:
            data, _ = self.tail_data[name]
            self.offsets[name] = (pos, pos + len(data))
            pos += len(data)
            tails += data
        _pwrite_all(self.fd, tails, self.data_start + self.fixed_end, self.path)
        header: dict = {"__metadata__": self.metadata}
        for name, (b, e) in sorted(self.offsets.items(), key=lambda kv: kv[1]):
            s = self.slots[name]
            shape = self.tail_data[name][1] if s.tail else s.shape
            header[name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(shape), "data_offsets": [b, e]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) > self.header_room:
            raise AssertionError("writer: header outgrew its reserved room")
        raw += b" " * (self.header_room - len(raw))
        _pwrite_all(self.fd, struct.pack("<Q", self.header_room) + raw, 0, self.path)
        size = self.data_start + pos
        try:
            os.ftruncate(self.fd, size)
            if sync:
                os.fsync(self.fd)  # delayed allocation: a full disk may only show here
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror}",
                              hint="free disk space (or choose another output folder) and run again"
                              if exc.errno == 28 else None) from exc
        os.close(self.fd)
        return size

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _copy_range(src: Path, src_offset: int, fd: int, offset: int, nbytes: int, path: Path) -> None:
    """Copy ``nbytes`` of ``src`` from ``src_offset`` into ``fd`` at ``offset``: ``os.copy_file_range`` where the
    kernel offers it for these files, else reads and writes of 16 MiB."""
    try:
        src_fd = os.open(src, os.O_RDONLY)
    except OSError as exc:
        raise InputError(f"{src}: cannot read ({exc.strerror})") from exc
    try:
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < nbytes:
                    n = os.copy_file_range(src_fd, fd, nbytes - done, src_offset + done, offset + done)
                    if n == 0:
                        raise InputError(f"{src}: ends before byte {src_offset + nbytes:,}",
                                         hint="the file changed while it was converted; run again")
                    done += n
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                    raise OutputError(f"cannot write {path}: {exc.strerror}",
                                      hint="free disk space (or choose another output folder) and run again"
                                      if exc.errno == errno.ENOSPC else None) from exc
        while done < nbytes:  # no copy_file_range between these files: through a buffer
            chunk = os.pread(src_fd, min(16 * 2**20, nbytes - done), src_offset + done)
            if not chunk:
                raise InputError(f"{src}: ends before byte {src_offset + nbytes:,}",
                                 hint="the file changed while it was converted; run again")
            _pwrite_all(fd, chunk, offset + done, path)
            done += len(chunk)
    finally:
        os.close(src_fd)


def _pwrite_all(fd: int, data, offset: int, path: Path) -> None:
    view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    try:
        while len(view):
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}",
                          hint="free disk space (or choose another output folder) and run again"
                          if exc.errno == 28 else None) from exc


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a small dict of tensors as one safetensors file. Not atomic by itself: write into a staging folder
    (:func:`qtool.format.atomic.staging_dir`), which is removed on error."""
    writer = ShardWriter(path, [Slot(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()])
    try:
        for key, t in tensors.items():
            writer.write(key, t)
        writer.close()
    except BaseException:
        writer.abort()
        raise
