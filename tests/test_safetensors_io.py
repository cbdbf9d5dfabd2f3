"""safetensors without trust: the validating reader (every malformed case names the file and tensor) and the
streaming writer (files the safetensors library reads back identically)."""
from __future__ import annotations

import errno
import json
import os
import random
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qtool.convert import readahead as ra_mod
from qtool.format import safetensors as sio
from qtool.errors import InputError, OutputError


def _raw_file(path: Path, header: dict, data: bytes = b"", header_len: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.f16": torch.randn(7, generator=g).half(),
        "c.bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "d.i64": torch.arange(5),
        "e.u8": torch.arange(9, dtype=torch.uint8),
        "f.bool": torch.tensor([True, False, True]),
        "g.f64": torch.randn(2, generator=g).double(),
        "h.empty": torch.zeros(0, 4),
        "i.f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
    }


# --------------------------------------------------------------------------------------------------------- reading
def test_reads_what_the_safetensors_library_writes(tmp_path):
    tensors = _sample_tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    with sio.read_header(path) as f:
        assert f.metadata == {"format": "pt", "note": "x"}
        assert set(f.tensors) == set(tensors)
        offsets = [(i.begin, i.end) for i in f.tensors.values()]
        assert offsets == sorted(offsets)  # file order
        for name, t in tensors.items():
            got = f.tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(torch.uint8) if t.numel() else got, t.view(torch.uint8) if t.numel() else t)
            f.prefetch(name)
            f.release(name)  # dropping pages must not change what a later read sees
            assert torch.equal(f.tensor(name).float(), t.float())


def test_misaligned_foreign_file_is_copied_not_failed(tmp_path):
    t = torch.arange(6, dtype=torch.float32)
    header = {"x": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}
    raw = json.dumps(header).encode() + b" "  # odd header length: data starts off a 4-byte boundary
    assert (8 + len(raw)) % 4
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + t.numpy().tobytes())
    with sio.read_header(path) as f:
        assert torch.equal(f.tensor("x"), t)


def _valid_header():
    return {"w": {"dtype": "F16", "shape": [2, 4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_bytes(b"\x10\x00\x00"), "truncated file \\(3 bytes"),
    (lambda p: p.write_bytes(b""), "truncated file \\(0 bytes"),
    (lambda p: _raw_file(p, _valid_header(), b"\0" * 24, header_len=200 * 2**20), "beyond the 100 MiB"),
    (lambda p: _raw_file(p, _valid_header(), b"\0" * 24, header_len=10_000), "runs beyond the end of the file"),
    (lambda p: p.write_bytes(struct.pack("<Q", 10) + b'{"w": [1, ' + b"\0" * 24), "header is not valid JSON"),
    (lambda p: p.write_bytes(struct.pack("<Q", 2) + b"\xff\xfe"), "header is not valid JSON"),
    (lambda p: _raw_file(p, [1, 2]), "header is not a JSON object"),
    (lambda p: _raw_file(p, {"__metadata__": [1]}), "__metadata__ is not an object"),
    (lambda p: _raw_file(p, {**_valid_header(), "w": {"dtype": "F4", "shape": [2, 4], "data_offsets": [0, 4]}},
                         b"\0" * 24), "tensor 'w' has unknown dtype 'F4'"),
    (lambda p: _raw_file(p, {"w": {"dtype": "F16", "shape": [2, 4]}}, b"\0" * 16), "tensor 'w' has a malformed"),
    (lambda p: _raw_file(p, {"w": {"dtype": "F16", "shape": [-2, 4], "data_offsets": [0, 16]}}, b"\0" * 16),
     "tensor 'w' has an invalid shape"),
    (lambda p: _raw_file(p, {"w": {"dtype": "F16", "shape": [2, 4], "data_offsets": [0, "16"]}}, b"\0" * 16),
     "tensor 'w' has an invalid shape or data_offsets"),
    (lambda p: _raw_file(p, _valid_header(), b"\0" * 20), "tensor 'b' data_offsets \\[16, 24\\] fall outside"),
    (lambda p: _raw_file(p, {**_valid_header(), "b": {"dtype": "F32", "shape": [2], "data_offsets": [30, 22]}},
                         b"\0" * 40), "tensor 'b' data_offsets \\[30, 22\\] fall outside"),
    (lambda p: _raw_file(p, {**_valid_header(), "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
                         b"\0" * 24), "tensors 'w' and 'b' overlap"),
    (lambda p: _raw_file(p, {"w": {"dtype": "F16", "shape": [8, 4], "data_offsets": [0, 64]},
                             "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [40, 48]}}, b"\0" * 64),
     "tensors 'w' and 'e' overlap"),
    (lambda p: _raw_file(p, {"w": {"dtype": "F16", "shape": [2, 4], "data_offsets": [0, 12]}}, b"\0" * 16),
     "tensor 'w' has 12 bytes of data but shape \\[2, 4\\] F16 needs 16"),
])
def test_malformed_files_are_refused_naming_file_and_tensor(tmp_path, make, match):
    path = tmp_path / "model-00001-of-00002.safetensors"
    make(path)
    before = path.read_bytes()
    with pytest.raises(InputError, match=match) as exc:
        sio.read_header(path)
    assert str(path) in str(exc.value)
    assert path.read_bytes() == before


# data layouts the safetensors library refuses (and one it accepts), each with what our message must say
LAYOUTS = {
    "contiguous": ({"w": [0, 16], "b": [16, 24]}, 24, None),
    "empty tensors at the boundaries": ({"e0": [0, 0], "w": [0, 16], "e1": [16, 16], "b": [16, 24]}, 24, None),
    "same bytes": ({"w": [0, 16], "b": [0, 16]}, 16, "tensors 'w' and 'b' overlap in the data section"),
    "partial overlap": ({"w": [0, 16], "b": [8, 24]}, 24, "tensors 'w' and 'b' overlap"),
    "empty tensor inside another": ({"w": [0, 16], "e": [8, 8], "b": [16, 24]}, 24, "tensors 'w' and 'e' overlap"),
    "gap between tensors": ({"w": [0, 16], "b": [20, 28]}, 28,
                            r"bytes 16..20 of the data section belong to no tensor \(between 'w' and 'b'\)"),
    "gap before the first tensor": ({"w": [8, 24]}, 24, r"bytes 0..8 .* \(before the first tensor 'w'\)"),
    "bytes after the last tensor": ({"w": [0, 16], "b": [16, 24]}, 32, "8 bytes after the last tensor 'b' belong to no"),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_data_section_layout_follows_the_safetensors_library(tmp_path, case):
    """The library refuses overlapping tensors, gaps and trailing bytes (Metadata::validate, read_metadata); so do
    we, naming the file and the tensors. The library itself is the oracle for which layouts are valid."""
    offsets, data_len, match = LAYOUTS[case]
    dtypes = {16: ("F16", [2, 4]), 8: ("F32", [2]), 0: ("F32", [0])}
    header = {name: {"dtype": dtypes[e - b][0], "shape": dtypes[e - b][1], "data_offsets": [b, e]}
              for name, (b, e) in offsets.items()}
    path = _raw_file(tmp_path / "model.safetensors", header, bytes(range(data_len)))
    try:
        with safe_open(path, "pt"):
            library_accepts = True
    except Exception:  # noqa: BLE001 - the library raises its own error types
        library_accepts = False
    assert library_accepts == (match is None)
    if match is None:
        with sio.read_header(path) as f:
            assert sorted(f.tensors) == sorted(offsets)
        return
    with pytest.raises(InputError, match=match) as exc:
        sio.read_header(path)
    assert str(path) in str(exc.value) and "fetch it again" in exc.value.hint


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        sio.read_header(tmp_path / "nope.safetensors")


def test_remedy_is_given_for_damaged_files(tmp_path):
    path = _raw_file(tmp_path / "m.safetensors", _valid_header(), b"\0" * 20)
    with pytest.raises(InputError) as exc:
        sio.read_header(path)
    assert exc.value.hint and "fetch it again" in exc.value.hint


# --------------------------------------------------------------------------------------------------------- writing
def _slots_and_tensors():
    tensors = {k: v for k, v in _sample_tensors().items()}
    slots = [sio.Slot(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    tails = {"z.blob": torch.tensor(list(b'{"a": 1}'), dtype=torch.uint8),
             "y.blob": torch.tensor(list(b'{"quant_type": "nf4"}'), dtype=torch.uint8)}
    slots += [sio.Slot(k, torch.uint8, (0,), tail=True) for k in tails]
    return slots, {**tensors, **tails}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_writer_output_reads_back_with_safetensors(tmp_path, seed):
    slots, tensors = _slots_and_tensors()
    path = tmp_path / "out.safetensors"
    w = sio.ShardWriter(path, slots, metadata={"k": "v"})
    order = list(tensors)
    random.Random(seed).shuffle(order)  # tensors arrive in any order
    for name in order:
        w.write(name, tensors[name])
    size = w.close()
    assert size == path.stat().st_size
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name].view(torch.uint8) if t.numel() else loaded[name],
                           t.view(torch.uint8) if t.numel() else t), name
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    with sio.read_header(path) as f:  # every tensor aligned for a zero-copy view, larger elements first
        sizes = [t.dtype.itemsize for t in f.tensors.values()]
        assert sizes == sorted(sizes, reverse=True)
        assert all(t.begin % t.dtype.itemsize == 0 for t in f.tensors.values())


def test_writer_file_does_not_depend_on_arrival_order_or_threads(tmp_path):
    """Tail slots are laid out in plan order at close, so shuffled arrivals from several threads give one file."""
    from concurrent.futures import ThreadPoolExecutor

    slots, tensors = _slots_and_tensors()
    digests = set()
    for seed in range(4):
        path = tmp_path / f"{seed}.safetensors"
        w = sio.ShardWriter(path, slots)
        order = list(tensors)
        random.Random(seed).shuffle(order)
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda name: w.write(name, tensors[name]), order))
        w.close()
        digests.add(path.read_bytes())
    assert len(digests) == 1
    with sio.read_header(tmp_path / "0.safetensors") as f:  # the tails last, in plan order
        assert list(f.tensors)[-2:] == ["z.blob", "y.blob"]


def test_writer_refuses_what_was_not_planned(tmp_path):
    slots, tensors = _slots_and_tensors()
    w = sio.ShardWriter(tmp_path / "o.safetensors", slots)
    with pytest.raises(AssertionError, match="unexpected"):
        w.write("nope", torch.zeros(1))
    with pytest.raises(AssertionError, match="planned"):
        w.write("a.f32", torch.zeros(3, 5, dtype=torch.float16))
    w.write("a.f32", tensors["a.f32"])
    with pytest.raises(AssertionError, match="repeated"):
        w.write("a.f32", tensors["a.f32"])
    with pytest.raises(AssertionError, match="exceeds"):
        w.write("z.blob", torch.zeros(10_000, dtype=torch.uint8))
    with pytest.raises(AssertionError, match="never written"):
        w.close()
    w.abort()


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: real(fd, bytes(memoryview(data)[:7]), off))
    slots, tensors = _slots_and_tensors()
    path = tmp_path / "o.safetensors"
    w = sio.ShardWriter(path, slots)
    for name, t in tensors.items():
        w.write(name, t)
    w.close()
    monkeypatch.undo()
    assert torch.equal(load_file(path)["a.f32"], tensors["a.f32"])


def test_disk_full_is_an_output_error(tmp_path, monkeypatch):
    def full(fd, data, off):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    slots, tensors = _slots_and_tensors()
    w = sio.ShardWriter(tmp_path / "o.safetensors", slots)
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OutputError, match="cannot write .*o.safetensors") as exc:
        w.write("a.f32", tensors["a.f32"])
    assert "free disk space" in exc.value.hint
    w.abort()


def test_uncreatable_output_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="cannot create"):
        sio.ShardWriter(tmp_path / "missing-dir" / "o.safetensors", [sio.Slot("a", torch.float32, (1,))])


# ------------------------------------------------------------------------------------------------------ readahead
def test_readahead_stays_within_its_window(tmp_path, monkeypatch):
    import threading

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"\0" * 1000)
    b.write_bytes(b"\0" * 1000)
    calls, lock = [], threading.Lock()

    def advise(fd, offset, n, advice):
        with lock:
            calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, n, advice))

    monkeypatch.setattr(os, "posix_fadvise", advise, raising=False)
    issued = lambda: sum(c[2] for c in calls)  # noqa: E731

    def settle(expected):
        deadline = time.monotonic() + 10
        while issued() != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # and nothing more arrives
        assert issued() == expected

    with ra_mod.Readahead([(a, 100, 1000), (b, 0, 500)], window_bytes=400, chunk_bytes=200) as ra:
        settle(400)  # two chunks, then it waits for the consumer
        ra.advance(300)
        settle(800)  # a chunk is issued while less than the window is outstanding
        ra.advance(10_000)
        settle(900 + 500)
    assert [(Path(p).name, off, n) for p, off, n, _ in calls] == [
        ("a", 100, 200), ("a", 300, 200), ("a", 500, 200), ("a", 700, 200), ("a", 900, 100), ("b", 0, 200),
        ("b", 200, 200), ("b", 400, 100)]
    assert all(c[3] == os.POSIX_FADV_WILLNEED for c in calls)


def test_readahead_stops_early_and_tolerates_missing_files(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"\0" * 4096)
    with ra_mod.Readahead([(tmp_path / "missing", 0, 10), (big, 0, 4096)], window_bytes=1024, chunk_bytes=512):
        pass  # exits without waiting for a consumer that never comes


def test_readahead_drops_behind_only_what_it_brought_in(tmp_path, monkeypatch):
    import threading

    a = tmp_path / "a"
    a.write_bytes(b"\0" * 1000)
    calls, lock = [], threading.Lock()

    def advise(fd, offset, n, advice):
        with lock:
            calls.append((offset, n, advice))

    monkeypatch.setattr(os, "posix_fadvise", advise, raising=False)
    dropped = lambda: [(off, n) for off, n, adv in calls if adv == os.POSIX_FADV_DONTNEED]  # noqa: E731

    def settle(expected):
        deadline = time.monotonic() + 10
        while dropped() != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert dropped() == expected

    monkeypatch.setattr(ra_mod, "any_page_cached", lambda fd, offset, n: offset == 200)  # this chunk was cached before
    with ra_mod.Readahead([(a, 0, 1000)], window_bytes=10_000, chunk_bytes=200) as ra:
        settle([])
        ra.advance(150)
        settle([])  # the first chunk is only partly consumed
        ra.advance(300)
        settle([(0, 200)])  # the second chunk (cached before) stays
        ra.advance(10_000)
        settle([(0, 200), (400, 200), (600, 200), (800, 200)])
    calls.clear()
    with ra_mod.Readahead([(a, 0, 1000)], window_bytes=10_000, chunk_bytes=200, drop_behind=False) as ra:
        ra.advance(10_000)
    assert not dropped()


def test_any_page_cached(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 * 4096))
    with open(path, "rb") as f:
        f.read()
        assert ra_mod.any_page_cached(f.fileno(), 100, 5000)  # just written and read: in the page cache
    r, w = os.pipe()
    try:
        assert ra_mod.any_page_cached(r, 0, 10)  # cannot tell (a pipe cannot be mapped): cached, so nothing is dropped
    finally:
        os.close(r), os.close(w)


def test_device_readahead_bytes(tmp_path):
    n = ra_mod.device_readahead_bytes(tmp_path)
    assert 128 * 1024 <= n <= 32 * 2**20 and n % 4096 == 0
    assert ra_mod.device_readahead_bytes(tmp_path / "missing") == 128 * 1024


def test_data_range(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_sample_tensors(), path)
    with sio.read_header(path) as f:
        begin, end = f.data_range
        assert begin == min(t.begin for t in f.tensors.values() if t.nbytes)
        assert end == path.stat().st_size


@pytest.mark.parametrize("how", ["copy_file_range", "no copy_file_range", "other file system"])
def test_writer_copies_tensors_file_to_file(tmp_path, monkeypatch, how):
    """copy_from: a tensor's bytes from a source file straight into its slot (the kernel's copy_file_range, else
    reads and writes): the same file as writing the tensor."""
    tensors = _sample_tensors()
    src = tmp_path / "src.safetensors"
    save_file(tensors, src)
    if how == "no copy_file_range":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    elif how == "other file system":
        def exdev(*a, **k):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        monkeypatch.setattr(os, "copy_file_range", exdev, raising=False)
    slots = [sio.Slot(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    w = sio.ShardWriter(tmp_path / "a.safetensors", slots)
    with sio.read_header(src) as f:
        for name, info in f.tensors.items():
            w.copy_from(name, src, info.begin, info.nbytes)
    w.close()
    ref = sio.ShardWriter(tmp_path / "b.safetensors", slots)
    for name, t in tensors.items():
        ref.write(name, t)
    ref.close()
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_writer_copy_disk_full_is_an_output_error(tmp_path, monkeypatch):
    src = tmp_path / "src.safetensors"
    save_file({"x": torch.arange(100.0)}, src)

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "copy_file_range", enospc, raising=False)
    w = sio.ShardWriter(tmp_path / "a.safetensors", [sio.Slot("x", torch.float32, (100,))])
    with sio.read_header(src) as f, pytest.raises(OutputError, match="No space left") as exc:
        w.copy_from("x", src, f.tensors["x"].begin, 400)
    assert "free disk space" in exc.value.hint
    w.abort()
