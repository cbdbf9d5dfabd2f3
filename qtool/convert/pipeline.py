"""``qtool convert``: a 16/32-bit Hugging Face checkpoint -> a pre-quantised bitsandbytes NF4 checkpoint.

The pipeline streams one tensor at a time: the input shards are memory-mapped, a background thread asks the kernel
to read up to 2 GiB ahead (from the start, so the disk works while transformers is imported), and processed pages
are dropped, so resident memory stays near the largest tensor whatever the model size. Each output shard is laid
out before any data is written (:class:`qtool.format.safetensors.ShardWriter`), so quantised tensors go straight to
their final place on disk; it is written back in the background as it grows, and fsynced and hashed in the
background once complete. Every quantised tensor is dequantised again as the loaders will and compared with its
source (:mod:`qtool.convert.verify`).
The output folder is built under a temporary name and renamed only when complete and verified.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qtool import __version__

from qtool.format import bnb_nf4 as layout

from qtool.nf4 import codec as nf4
from qtool.convert.arguments import check_settings
from qtool.format.atomic import check_destination, staging_dir, write_text
from qtool.errors import InputError, OutputError, VerificationError
from qtool.adapters.spec import AdapterSpec
from qtool.arch import shape_from_config
from qtool.convert.lora_init import LoraInit
from qtool.convert.readahead import Readahead
from qtool.format.safetensors import ShardWriter, Slot
from qtool.convert.selection import Selection, SelectionInChild, start_selection
from qtool.format.checkpoint import (DEFAULT_MAX_SHARD, Checkpoint, open_checkpoint, plan_shards, shard_name,
                                     write_metadata)
from qtool.convert.verify import TensorCheck, check_tensor, gaussian_rel_error
from qtool.format.report import REPORT_NAME, sha256_file

FLUSH_BYTES = 256 * 2**20  # output written between background fsyncs of the shard being written
N_WORKERS = 2  # tensors converted at once, one thread each (see _in_order)
# Test hook: seconds to sleep after each tensor and once before the final rename, so that crash tests can SIGKILL
# a run while it writes shards and when it is complete but not yet in place. Unset (the default): no effect.
TEST_SLEEP_ENV = "QTOOL_TEST_SLEEP_AFTER_TENSOR"
ProgressFn = Callable[[int, int, str], None]  # (bytes done, bytes total, tensor name)


@dataclass
class ConvertResult:
    out: Path
    tensors: list[TensorCheck]
    shards: dict[str, dict]  # file name -> {"bytes", "sha256"}
    seconds: float
    input_bytes: int
    output_bytes: int
    largest_tensor_bytes: int
    peak_rss_bytes: int
    settings: dict = field(default_factory=dict)
    lora_init: dict | None = None  # --lora-init: the spec and, per targeted weight, the initial model's error

    @property
    def flagged(self) -> list[TensorCheck]:
        return [t for t in self.tensors if t.flag]

    def to_json(self) -> dict:
        return {
            "qtool_version": __version__, "format_version": layout.FORMAT_VERSION, "output": str(self.out),
            "settings": self.settings, "seconds": round(self.seconds, 3), "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes, "largest_tensor_bytes": self.largest_tensor_bytes,
            "peak_rss_bytes": self.peak_rss_bytes, "shards": self.shards,
            "n_quantized": sum(t.quantized for t in self.tensors), "n_flagged": len(self.flagged),
            "tensors": [t.to_json() for t in self.tensors],
            **({"lora_init": self.lora_init} if self.lora_init is not None else {}),
        }


@dataclass(frozen=True)
class _Group:
    key: str
    slots: list[Slot]
    quantized: bool
    transpose: bool


def _plan_shards(ck: Checkpoint, quantize: dict[str, bool], blocksize: int, double_quant: bool,
                 max_shard_bytes: int) -> list[list[_Group]]:
    """Assign tensors (a quantised weight and its five companions together) to shards in file order
    (:func:`qtool.format.checkpoint.plan_shards`; a quantised group counts its quant-state blob at its largest)."""
    groups = []
    for key in ck.keys:
        info = ck.info(key)
        if key in quantize:
            shape = info.shape[::-1] if quantize[key] else info.shape
            group = _Group(key, layout.weight_slots(key, tuple(shape), blocksize, double_quant), True, quantize[key])
        else:
            group = _Group(key, [Slot(key, info.dtype, info.shape)], False, False)
        groups.append((group, sum(s.nbytes for s in group.slots) + (layout.MAX_BLOB_BYTES if group.quantized else 0)))
    return plan_shards(groups, max_shard_bytes)


def peak_rss_bytes() -> int:
    """High-water resident memory of this process. On Linux from VmHWM: ``ru_maxrss`` also counts the memory of the
    process that spawned this one (the kernel carries its high-water mark over fork + exec), so ``qtool convert``
    started from a large process (a notebook, pytest) would report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere
    except ImportError:  # pragma: no cover
        return 0


def _compute_dtype(config: dict, quantize: dict, ck: Checkpoint) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype")
    if name in ("float16", "bfloat16", "float32"):
        return layout.dtype_from_str(name)
    dtypes = {ck.info(k).dtype for k in quantize}
    return dtypes.pop() if len(dtypes) == 1 else torch.bfloat16


def convert(src, out, *, blocksize: int = 64, double_quant: bool = True, target: str = "cuda", device: str = "cpu",
            skip: list[str] | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD, overwrite: bool = False,
            max_rel_error: float | None = None, progress: ProgressFn | None = None,
            lora_init: AdapterSpec | None = None) -> ConvertResult:
    """Convert checkpoint ``src`` (folder or cached hub id) into folder ``out``. See the module docstring.

    ``lora_init`` (an :class:`AdapterSpec` with init ``pissa`` or ``loftq``) stores each targeted weight as the NF4
    residual of that initialisation and writes the initial adapter to ``out/qtool_lora_init`` (see
    :mod:`qtool.convert.lora_init`).

    ``target`` picks which bitsandbytes backend's bytes to reproduce ('cuda' or 'cpu', see :mod:`qtool.nf4.codec`);
    ``device`` is where the quantisation runs ('cpu', 'cuda' or 'cuda:N'): with target 'cuda', a GPU writes the
    bytes bitsandbytes makes on that GPU, exactly; otherwise the device does not change the bytes.
    Raises InputError/OutputError/VerificationError; on any error ``out`` is left as it was.
    """
    t0 = time.perf_counter()
    test_sleep = float(os.environ.get(TEST_SLEEP_ENV) or 0)
    check_settings(blocksize, target, device, max_rel_error)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available", hint="use --device cpu")
    ck = open_checkpoint(src)
    with contextlib.closing(ck):
        check_destination(Path(out), overwrite, inputs=(ck.folder,))  # before any work (checked again at the end)
        init = None if lora_init is None else LoraInit(lora_init, shape_from_config(ck.config, str(ck.folder)))
        # which tensors: known from the keys for common architectures, else decided by transformers in a child
        # process (started before any thread here), while the disk reads ahead
        with start_selection(ck.config, ck.folder, ck.keys, skip) as selecting, \
                Readahead([(s.path, *s.data_range) for s in ck.shards]) as readahead:
            gaussian_rel_error(blocksize)  # the flags' reference error (~0.1 s), while a child decides
            return _convert(ck, selecting.result(), readahead, out, blocksize, double_quant, target, device, skip,
                            max_shard_bytes, overwrite, max_rel_error, progress, t0, test_sleep, init)


def _convert(ck: Checkpoint, sel: Selection, readahead: Readahead, out, blocksize, double_quant, target, device,
             skip, max_shard_bytes, overwrite, max_rel_error, progress, t0: float, test_sleep: float,
             init: LoraInit | None = None) -> ConvertResult:
    for key in sel.quantize:
        info = ck.info(key)
        if info.dtype not in (torch.float16, torch.bfloat16, torch.float32) or len(info.shape) != 2:
            raise InputError(f"{ck.key_shard[key].path}: Linear weight {key!r} is {info.dtype} {list(info.shape)}; "
                             "qtool quantises 2-D float16/bfloat16/float32 weights")
    if init is not None:
        left_out = [k for k in init.keys if k not in sel.quantize or sel.quantize[k]]  # value: transposed
        if left_out:
            raise InputError(f"--lora-init: {left_out[0]} is not quantised (skipped, or not in the checkpoint)",
                             hint="target modules that the conversion quantises, or drop --skip for them")
    plan = _plan_shards(ck, sel.quantize, blocksize, double_quant, max_shard_bytes)
    total = sum(ck.info(k).nbytes for k in ck.keys)
    settings = {"blocksize": blocksize, "double_quant": double_quant, "target": target, "device": device,
                "skip": skip or [], "source": str(ck.folder), "model_class": sel.model_class,
                "kept_linears": sel.kept_linears, "selection": sel.method,
                # the double-quant offset is torch.mean, whose last bit depends on torch's thread count (as in
                # bitsandbytes): `qtool verify --source` re-quantises with the same count
                "torch_threads": torch.get_num_threads()}
    budget = 2 * max(ck.info(k).nbytes for k in ck.keys)  # bytes in flight: the RSS bound is 2x + 512 MiB
    with staging_dir(Path(out), overwrite, inputs=(ck.folder,)) as stage, \
            ThreadPoolExecutor(1, thread_name_prefix="qtool-seal") as sealer, \
            ThreadPoolExecutor(N_WORKERS, thread_name_prefix="qtool-quantize") as workers:
        checks, done, weight_map, sealed = [], 0, {}, {}
        for i, groups in enumerate(plan):
            name = shard_name(i, len(plan))
            writer = ShardWriter(stage / name, [s for g in groups for s in g.slots], max_tail_bytes=layout.MAX_BLOB_BYTES)
            flushing, unflushed = None, 0
            job = lambda g: _convert_one(ck, g, writer, blocksize, double_quant, target, device, init)  # noqa: E731
            try:
                for g, check in _in_order(groups, job, workers, lambda g: _cost(ck, g), budget):
                    checks.append(check)
                    for s in g.slots:
                        weight_map[s.name] = name
                    done += ck.info(g.key).nbytes
                    ck.key_shard[g.key].release(g.key)
                    readahead.advance(ck.info(g.key).nbytes)  # after release: it may drop these pages now
                    unflushed += sum(s.nbytes for s in g.slots)
                    if unflushed > FLUSH_BYTES and (flushing is None or flushing.done()):
                        # write back in the background as we go, so the final fsync has little left to do
                        flushing, unflushed = sealer.submit(_fsync, stage / name), 0
                    if progress:
                        progress(done, total, g.key)
                    if test_sleep:
                        time.sleep(test_sleep)
                writer.close(sync=False)
            except BaseException:
                writer.abort()
                raise
            sealed[name] = sealer.submit(_seal_shard, stage / name)  # overlaps with the next shard
        shards = {name: sealed[name].result() for name in sorted(sealed)}
        _write_metadata(ck, stage, sel, weight_map, shards, double_quant, plan)
        if init is not None:
            init.write(stage, shards)
        result = ConvertResult(Path(out), checks, shards, 0.0, total, sum(s["bytes"] for s in shards.values()),
                               max(ck.info(k).nbytes for k in ck.keys), 0, settings,
                               None if init is None else init.report())
        worst = max((t for t in checks if t.quantized), key=lambda t: t.rel_error, default=None)
        if max_rel_error is not None and worst is not None and worst.rel_error > max_rel_error:
            raise VerificationError(
                f"tensor {worst.name!r} reconstructs with relative error {worst.rel_error:.4f} > "
                f"--max-rel-error {max_rel_error}", hint="nothing was written; inspect the tensor or raise the limit")
        result.seconds = time.perf_counter() - t0
        result.peak_rss_bytes = peak_rss_bytes()
        write_text(stage / REPORT_NAME, json.dumps(result.to_json(), indent=1))
        if test_sleep:
            time.sleep(test_sleep)  # the test hook again: complete, not yet renamed into place
    return result


def _fsync(path: Path) -> None:
    """Write a file's dirty pages to disk (through a descriptor of its own: safe beside the writer's)."""
    try:
        with open(path, "rb") as f:
            os.fsync(f.fileno())  # delayed allocation: a full disk may only show here
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}",
                          hint="free disk space and run again" if exc.errno == errno.ENOSPC else None) from exc


def _seal_shard(path: Path) -> dict:
    """fsync a finished shard and hash it: run in a background thread while the next shard is converted. The fsync
    (waiting for the disk) runs beside the hash (reading the page cache): for the last shard both are on the clock."""
    with ThreadPoolExecutor(1, thread_name_prefix="qtool-fsync") as syncer:
        synced = syncer.submit(_fsync, path)
        digest = sha256_file(path)
        synced.result()
    return {"bytes": path.stat().st_size, "sha256": digest}


def _in_order(groups: list[_Group], job, workers: ThreadPoolExecutor, cost, budget: int):
    """Run ``job(g)`` for each group on the worker threads; yield ``(g, result)`` in the order of ``groups``. Up to
    N_WORKERS + 1 groups are in flight (one queued, so that no worker waits for the caller) and, beyond the first,
    only while they cost at most ``budget`` bytes of memory.

    Why whole tensors per thread rather than each tensor split over both cores: a split tensor waits for its slower
    half, and on 2 cores the readahead, write-back and hashing threads keep slowing one half; two independent tensors
    just take turns. A group that cannot have company runs its kernels on all N_WORKERS threads.
    A group's memory counts until the caller asks for the next result (after it has released the group's pages).
    Errors: the first one (in order) is raised once the jobs in flight have finished, so that none still writes."""
    pending: deque = deque()  # (group, future, cost), in order
    in_flight = 0
    try:
        for g in groups:
            while pending and (len(pending) > N_WORKERS or in_flight + cost(g) > budget):
                done, fut, c = pending.popleft()
                yield done, fut.result()
                in_flight -= c
            share = 1 if 2 * cost(g) > budget else N_WORKERS  # of the CPU kernels' threads
            pending.append((g, workers.submit(_with_kernel_threads, share, job, g), cost(g)))
            in_flight += cost(g)
        while pending:
            done, fut, c = pending.popleft()
            yield done, fut.result()
    finally:
        for _, fut, _ in pending:
            fut.cancel()
        wait([fut for _, fut, _ in pending])


def _with_kernel_threads(share: int, job, g: _Group):
    with nf4.kernel_threads(share):
        return job(g)


def _cost(ck: Checkpoint, g: _Group) -> int:
    """Resident bytes while group ``g`` is converted: its source pages, its outputs, and a transposed copy."""
    nbytes = ck.info(g.key).nbytes
    if not g.quantized:
        return nbytes
    return nbytes * (2 if g.transpose else 1) + sum(s.nbytes for s in g.slots)


def _convert_one(ck: Checkpoint, g: _Group, writer: ShardWriter, blocksize, double_quant, target, device,
                 init: LoraInit | None = None) -> TensorCheck:
    shard, info = ck.key_shard[g.key], ck.info(g.key)
    if not g.quantized:  # copied by the kernel, file to file: never mapped here
        writer.copy_from(g.key, shard.path, info.begin, info.nbytes)
        return TensorCheck.copied(g.key, info.shape, info.dtype)
    w = shard.tensor(g.key)
    if g.transpose:
        w = w.t().contiguous()
    if init is not None and init.wants(g.key):  # the residual of the adapter's init is what gets stored
        qw, w_res = init.quantize(g.key, w.to(device), blocksize, double_quant, target)
        qw, w = qw.to("cpu"), w_res.to("cpu")
        error = None
    elif device == "cpu":  # the error is measured in the quantising pass (one read of the source instead of two)
        qw, error = nf4.quantize_with_error(w, blocksize, double_quant, target, name=g.key)
    else:
        qw, error = nf4.quantize(w.to(device), blocksize, double_quant, target, name=g.key).to("cpu"), None
    for name, tensor in layout.weight_entries(g.key, qw).items():
        writer.write(name, tensor)
    return check_tensor(g.key, w, qw, error)


def _write_metadata(ck: Checkpoint, stage: Path, sel, weight_map: dict, shards: dict, double_quant: bool, plan) -> None:
    """config.json with the quantization_config, the index and the source's other files (shared with merge)."""
    config = dict(ck.config)
    config["quantization_config"] = layout.quantization_config(_compute_dtype(ck.config, sel.quantize, ck),
                                                               double_quant, sel.skip_modules_config)
    write_metadata(stage, config, weight_map, ck)
