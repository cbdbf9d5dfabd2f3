"""How fast is the converter? Prints numbers, then a short table, and writes them to bench/results/convert_speed.md.

0. First run and warm runs of ``qtool convert`` on the real SmolLM2-135M fixture (0.27 GB; tools/fixtures.py,
   ``$QTOOL_FIXTURES``), each in a fresh process, wall time: the first with an empty kernel cache (the build of the C
   kernels if qtool was not installed with pip, or numba's JIT for a version that has it), then warm ones. Also the
   build of the C kernels alone (what ``pip install`` does once).
1. CPU quantisation of one 8192x8192 fp16 tensor, double quantisation on, bit-identical outputs checked: ours
   (``nf4.quantize(target="cpu")``, the C kernels) against bitsandbytes' CPU ``quantize_4bit``, interleaved repetitions after
   a warm-up; median and best, Mparam/s, and the ratio (target: >= 20x).
2. End to end: ``qtool convert`` (a fresh process, wall time: Python start-up and imports included) against just
   reading the input shards (plain reads in this process), for a synthetic Llama-shaped fp16 checkpoint of >= 3 GB
   in several shards. Cold page cache for both (fsync + POSIX_FADV_DONTNEED on every input file before each timed
   run), and warm. Target: convert <= 1.5x read, cold. ``--large`` adds cold runs on Llama-2-7B's shape (13.5 GB).
3. Peak RSS of the converting process beside the largest tensor (bound: 2 x largest + 512 MiB).
5. End to end against bitsandbytes (``--cases bnb``): ``qtool convert`` of a 1.33 GB fp16 Llama-shaped checkpoint
   (2 layers of hidden 4096 / intermediate 11008, 32k vocabulary; warm page cache, fresh process, wall time) against
   bitsandbytes' CPU ``quantize_4bit`` of the same 14 linear weights alone (the tensors already in memory: its
   quantise-only time), interleaved repetitions. Target: convert <= 1/5 of bitsandbytes' time.
4. With ``--profile``: where the time of one cold conversion of the largest checkpoint goes, stage by stage, wall
   clock and CPU (thread CPU time of the quantising, writing and hashing calls, which run on worker threads; a
   cProfile of the main thread would miss them).

An untimed conversion runs before the timed ones of 1-5, so every timed run there has warm kernels. The machine is shared: runs are interleaved
(read, convert, read, convert, ...) and medians reported; the CPU time of each conversion says whether it was bound
by the CPU (CPU time ~ 2 x wall on 2 cores) or by the disk.

    python bench/convert_speed.py                  # all cases below but --large, in a temporary folder
    python bench/convert_speed.py --cases first-run,bnb --reps 3    # the first hour of a new user
    python bench/convert_speed.py --workdir /tmp/qb --keep --reps 5 --large
    python bench/convert_speed.py --large --profile   # the full run: both checkpoints and the stage breakdown

The machine may be shared: the runs of each comparison are interleaved and medians reported.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Llama-shaped fp16 checkpoints: ~3.1 GB (TinyLlama-1.1B's widths, 32 layers: 1.54 B parameters) and, with
# --large, ~13.5 GB: Llama-2-7B's exact shape (6.74 B parameters), the converter's headline case, where start-up is
# a smaller share
SHAPES = {"3GB": dict(hidden=2048, intermediate=5632, n_layers=32, vocab=32000, n_kv=4),
          "7B": dict(hidden=4096, intermediate=11008, n_layers=32, vocab=32000, n_kv=32),
          "1.3GB": dict(hidden=4096, intermediate=11008, n_layers=2, vocab=32000, n_kv=64)}  # issue 13's case
CASES = ("first-run", "tensor", "bnb", "e2e")
SHARD_BYTES = 700 * 2**20
CLI = [sys.executable, "-c", "from qtool.cli import main; main()"]
# Runs a command as its child and reports the child's ru_maxrss: the extra hop keeps this process's own RSS out of
# the child's high-water mark (the kernel carries it over fork + exec).
LAUNCHER = ("import json, os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "_, st, ru = os.wait4(p.pid, 0); print(json.dumps({'rc': os.waitstatus_to_exitcode(st), "
            "'maxrss_kib': ru.ru_maxrss, 'cpu_s': ru.ru_utime + ru.ru_stime}))")


def evict(folder: Path) -> None:
    """Drop the files of ``folder`` from the page cache (after writing back what is dirty)."""
    for p in Path(folder).rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_all(folder: Path, chunk: int = 16 * 2**20) -> int:
    """Read every shard once, sequentially, into one reused buffer; return the bytes read."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    for p in sorted(folder.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def convert_once(src: Path, out: Path, env: dict | None = None, target: str = "cpu") -> tuple[float, dict, int]:
    """Wall seconds of ``qtool convert src out --target TARGET --json`` in a fresh process, its report (plus the
    process's CPU seconds as ``cpu_s``), and the process's peak RSS (bytes, ru_maxrss through the launcher)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *CLI, "convert", str(src), str(out), "--target", target,
                           "--json"], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - t0
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    if child["rc"] != 0:
        raise SystemExit(f"qtool convert failed:\n{proc.stderr}")
    report = json.loads((out / "qtool_report.json").read_text())
    report["cpu_s"] = child["cpu_s"]
    return seconds, report, child["maxrss_kib"] * 1024


def fmt_s(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} s, best {min(values):.2f} s (runs: " + \
        ", ".join(f"{v:.2f}" for v in values) + ")"


# ----------------------------------------------------------------------------------------- 0. first run, warm
def bench_first_run(work: Path, reps: int) -> dict | None:
    """Fresh-process conversions of the SmolLM2 fixture with the default target: the first with empty kernel caches,
    then ``reps`` warm ones; and the build of the C kernels on its own."""
    from tools import fixtures

    try:
        src = fixtures.smollm2()
    except Exception as exc:  # noqa: BLE001 - reported, the other cases still run
        print(f"[0] no SmolLM2 fixture ({exc}); skipped")
        return None
    out, cold = work / "out-first-run", work / "empty-kernel-cache"
    res: dict = {"src": str(src), "input_bytes": sum(p.stat().st_size for p in src.glob("*.safetensors"))}
    try:
        from qtool.nf4 import _build
    except ImportError:  # a version of qtool before the C kernels (numba)
        _build = None
    installed = _build is not None and _build.installed_path().exists()
    res["kernels"] = ("C, built at pip install" if installed else "C, built on first use" if _build else "numba JIT")
    if _build is not None:
        t = time.perf_counter()
        _build.build(work / "kernel-build" / "k.so", _build.source_sha256())
        res["build_s"] = time.perf_counter() - t
        print(f"[0] building the C kernels alone: {res['build_s']:.2f} s")
    shutil.rmtree(cold, ignore_errors=True)
    env = {"QTOOL_KERNEL_CACHE": str(cold / "qtool"), "NUMBA_CACHE_DIR": str(cold / "numba")}
    seconds, report, _ = convert_once(src, out, env=env, target="cuda")
    res["first"], res["first_in_convert"], res["first_cpu"] = seconds, report["seconds"], report["cpu_s"]
    warm, inside, cpu = [], [], []
    for _ in range(reps):
        seconds, report, _ = convert_once(src, out, env=env, target="cuda")
        warm.append(seconds)
        inside.append(report["seconds"])
        cpu.append(report["cpu_s"])
    res.update(warm=warm, warm_in_convert=inside, warm_cpu=cpu)
    shutil.rmtree(out, ignore_errors=True)
    print(f"[0] qtool convert SmolLM2-135M ({res['input_bytes'] / 1e9:.2f} GB), kernels: {res['kernels']}")
    print(f"    first run (empty kernel caches): {res['first']:.2f} s wall, inside convert() "
          f"{res['first_in_convert']:.2f} s, CPU {res['first_cpu']:.1f} s")
    print(f"    warm: {fmt_s(warm)}; inside convert() median {statistics.median(inside):.2f} s, CPU median "
          f"{statistics.median(cpu):.1f} s")
    return res


# ------------------------------------------------------------------------------------------------- 1. one tensor
def bench_tensor(reps: int) -> dict:
    import torch
    import bitsandbytes.functional as F

    from qtool.nf4 import codec as nf4

    w = (torch.randn(8192, 8192, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.float16)
    n = w.numel()
    ours = lambda: nf4.quantize(w, 64, True, target="cpu")  # noqa: E731
    theirs = lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)  # noqa: E731
    qw, (packed, qs) = ours(), theirs()  # warm-up (kernel load, allocator) and the identity check
    identical = (torch.equal(qw.packed, packed) and torch.equal(qw.absmax, qs.absmax)
                 and torch.equal(qw.nested_absmax, qs.state2.absmax) and qw.offset == qs.offset.item())
    t_ours, t_bnb = [], []
    for _ in range(reps):  # interleaved, so that machine noise hits both alike
        t = time.perf_counter()
        ours()
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        theirs()
        t_bnb.append(time.perf_counter() - t)
    res = {"n": n, "identical": identical, "ours": t_ours, "bnb": t_bnb,
           "ratio_median": statistics.median(t_bnb) / statistics.median(t_ours), "ratio_best": min(t_bnb) / min(t_ours)}
    print(f"[1] 8192x8192 fp16, bit-identical: {identical}")
    print(f"    ours {fmt_s(t_ours)}, {n / statistics.median(t_ours) / 1e6:.0f} Mparam/s (median)")
    print(f"    bnb  {fmt_s(t_bnb)}, {n / statistics.median(t_bnb) / 1e6:.0f} Mparam/s (median)")
    print(f"    ratio {res['ratio_median']:.1f}x (medians), {res['ratio_best']:.1f}x (best)")
    return res


# ------------------------------------------------------------------------------------------------ 2. end to end
def bench_end_to_end(work: Path, reps: int, size: str = "3GB", warm: bool = True) -> dict:
    from tests.conftest import write_llama_checkpoint

    src, out = work / f"src-{size}", work / "out"
    if not (src / "model.safetensors.index.json").exists():
        t = time.perf_counter()
        write_llama_checkpoint(src, **SHAPES[size], dtype="float16", shard_bytes=SHARD_BYTES)
        print(f"[2] wrote the synthetic checkpoint in {time.perf_counter() - t:.1f} s")
    input_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    n_shards = len(list(src.glob("*.safetensors")))
    print(f"[2] {src}: {input_bytes / 1e9:.2f} GB in {n_shards} shards")
    convert_once(src, out)  # untimed: kernels built, imports warm
    cold_read, cold_conv, warm_read, warm_conv, rss, reports = [], [], [], [], [], []
    for _ in range(reps):
        evict(src)
        t = time.perf_counter()
        read_all(src)
        cold_read.append(time.perf_counter() - t)
        shutil.rmtree(out, ignore_errors=True)
        evict(src)
        seconds, report, peak = convert_once(src, out)
        cold_conv.append(seconds)
        reports.append(report)
        rss.append(peak)
    for _ in range(reps if warm else 0):
        read_all(src)  # the cache is warm from here on
        t = time.perf_counter()
        read_all(src)
        warm_read.append(time.perf_counter() - t)
        seconds, _, _ = convert_once(src, out)
        warm_conv.append(seconds)
    shutil.rmtree(out, ignore_errors=True)
    res = {"size": size, "shape": SHAPES[size], "input_bytes": input_bytes, "n_shards": n_shards,
           "cold_read": cold_read, "cold_convert": cold_conv, "warm_read": warm_read, "warm_convert": warm_conv,
           "peak_rss": rss, "report_peak_rss": [r["peak_rss_bytes"] for r in reports],
           "in_convert_seconds": [r["seconds"] for r in reports], "cpu_seconds": [r["cpu_s"] for r in reports],
           "largest_tensor_bytes": reports[0]["largest_tensor_bytes"], "output_bytes": reports[0]["output_bytes"]}
    print(f"    cold read     {fmt_s(cold_read)}, {input_bytes / statistics.median(cold_read) / 1e9:.2f} GB/s")
    print(f"    cold convert  {fmt_s(cold_conv)}; of which inside convert(): "
          f"{statistics.median(res['in_convert_seconds']):.2f} s (the rest: Python start-up, imports and exit); "
          f"CPU {statistics.median(res['cpu_seconds']):.1f} s")
    print(f"    convert / read, cold: {statistics.median(cold_conv) / statistics.median(cold_read):.2f}x (medians)")
    if warm_read:
        print(f"    warm read     {fmt_s(warm_read)}")
        print(f"    warm convert  {fmt_s(warm_conv)}")
        print(f"    convert / read, warm: {statistics.median(warm_conv) / statistics.median(warm_read):.2f}x")
    largest = res["largest_tensor_bytes"]
    bound = 2 * largest + 512 * 2**20
    print(f"[3] peak RSS {max(rss) / 2**20:.0f} MiB (report: {max(res['report_peak_rss']) / 2**20:.0f} MiB); "
          f"largest tensor {largest / 2**20:.0f} MiB; bound 2 x largest + 512 MiB = {bound / 2**20:.0f} MiB")
    return res


# ------------------------------------------------------------------------------------ 5. against bitsandbytes
BNB_ONLY = """
import json, sys, time
import bitsandbytes.functional as F
from safetensors import safe_open
src, keys = sys.argv[1], json.loads(sys.argv[2])
index = json.load(open(src + "/model.safetensors.index.json"))["weight_map"]
total = 0.0
for key in keys:
    with safe_open(src + "/" + index[key], "pt") as f:
        w = f.get_tensor(key)
    t = time.perf_counter()
    F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    total += time.perf_counter() - t
    del w
print(total)
"""


def bnb_quantize_only(src: Path, keys: list[str]) -> float:
    """Seconds bitsandbytes' CPU ``quantize_4bit`` (NF4, double quantisation: what transformers' quantise-on-load
    calls) takes for the tensors ``keys`` of checkpoint ``src``, each already in memory (its quantise-only time),
    measured in a fresh process with the same OpenMP setting as the ``qtool`` CLI's (it makes no difference to
    bitsandbytes' large operations: measured)."""
    proc = subprocess.run([sys.executable, "-c", BNB_ONLY, str(src), json.dumps(keys)], capture_output=True, text=True,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def bench_against_bnb(work: Path, reps: int) -> dict:
    from tests.conftest import write_llama_checkpoint

    src, out = work / "src-1.3GB", work / "out-bnb"
    if not (src / "model.safetensors.index.json").exists():
        write_llama_checkpoint(src, **SHAPES["1.3GB"], dtype="float16", shard_bytes=SHARD_BYTES)
    input_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    read_all(src)  # warm page cache for both
    _, report, _ = convert_once(src, out)  # untimed: kernels and imports warm; the keys qtool quantises
    keys = [t["name"] for t in json.loads((out / "qtool_report.json").read_text())["tensors"] if t["quantized"]]
    conv, inside, cpu, bnb = [], [], [], []
    for _ in range(reps):  # interleaved
        read_all(src)
        seconds, report, _ = convert_once(src, out, target="cuda")
        conv.append(seconds)
        inside.append(report["seconds"])
        cpu.append(report["cpu_s"])
        bnb.append(bnb_quantize_only(src, keys))
    shutil.rmtree(out, ignore_errors=True)
    res = {"input_bytes": input_bytes, "n_quantized": len(keys), "convert": conv, "in_convert": inside, "cpu": cpu,
           "bnb": bnb, "ratio": statistics.median(bnb) / statistics.median(conv)}
    print(f"[5] {input_bytes / 1e9:.2f} GB fp16 Llama-shaped checkpoint, {len(keys)} linear weights (warm page cache)")
    print(f"    qtool convert (end to end, fresh process): {fmt_s(conv)}; inside convert() median "
          f"{statistics.median(inside):.2f} s; CPU median {statistics.median(cpu):.1f} s")
    print(f"    bitsandbytes quantize_4bit of the same weights alone: {fmt_s(bnb)}")
    print(f"    bitsandbytes quantise-only / qtool end to end: {res['ratio']:.1f}x (medians; target >= 5x)")
    return res


def profile_cold(work: Path, size: str, e2e: dict) -> str:
    """Where one cold conversion of checkpoint ``size`` spends its time, run in this process (torch and qtool
    imported before): wall clock of the serial stages, and thread CPU time of the calls that run on the worker and
    sealing threads. ``e2e`` (that checkpoint's end-to-end results) gives what happens outside ``convert()``."""
    import resource
    from collections import defaultdict

    import qtool.convert.pipeline as qc
    from qtool.nf4 import codec as nf4
    from qtool.format.safetensors import ShardWriter

    spent: dict = defaultdict(lambda: [0.0, 0.0, 0])  # label -> [wall, thread CPU, calls]
    originals = []

    def timed(owner, name, label):
        fn = getattr(owner, name)
        originals.append((owner, name, fn))

        def wrapper(*args, **kwargs):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                rec = spent[label]
                rec[0] += time.perf_counter() - t
                rec[1] += time.thread_time() - c
                rec[2] += 1
        setattr(owner, name, wrapper)

    import qtool.convert.selection as qs

    timed(qs.SelectionInChild, "result", "select")
    timed(nf4, "quantize_with_error", "quantise")
    timed(ShardWriter, "write", "write")
    timed(qc, "_seal_shard", "seal")
    src, out = work / f"src-{size}", work / "out-profile"
    shutil.rmtree(out, ignore_errors=True)
    evict(src)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    ru0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    try:
        qc.convert(src, out, target="cpu")
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    total, ru1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = kids1.ru_utime - kids0.ru_utime + kids1.ru_stime - kids0.ru_stime  # the forked selection
    shutil.rmtree(out, ignore_errors=True)
    cpu = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
    med = statistics.median
    outside = med(e2e["cold_convert"]) - med(e2e["in_convert_seconds"])
    (sel_w, sel_c, _), (q_w, q_c, q_n), (w_w, w_c, w_n), (s_w, s_c, _) = (
        spent[k] for k in ("select", "quantise", "write", "seal"))
    loop = total - sel_w - s_w
    rows = [
        ("outside convert(): Python start-up, `import torch`, exit", f"{outside:.2f}", "~same", "one core; medians of the runs above"),
        ("select (forked child): transformers import, meta model", f"{sel_w:.2f}", f"{sel_c + child_cpu:.2f}",
         "waited for here; the readahead reads and the kernels load meanwhile"),
        ("tensor loop, two worker threads", f"{loop:.2f}", "", f"{e2e['input_bytes'] / 1e9 / loop:.2f} GB/s of input"),
        (f"- quantise + measure ({q_n} tensors, fused C kernels)", "", f"{q_c:.2f}", f"{q_w - q_c:.2f} s waiting (I/O, preempted)"),
        (f"- write ({w_n} tensors into the page cache)", "", f"{w_c:.2f}", f"{w_w - w_c:.2f} s waiting"),
        ("- other: readahead, page faults, glue, write-back", "", f"{cpu - sel_c - q_c - w_c - s_c:.2f}", "all threads"),
        ("seal the last shard: fsync + sha256 (after the loop)", f"{s_w:.2f}", f"{s_c:.2f}", "one core"),
        ("convert() in all", f"{total:.2f}", f"{cpu + child_cpu:.2f}",
         f"CPU / wall = {(cpu + child_cpu) / total:.2f} cores busy"),
    ]
    from tabulate import tabulate

    text = (f"cold convert() of the {e2e['input_bytes'] / 1e9:.2f} GB checkpoint in the benchmark process\n\n"
            + tabulate(rows, headers=["stage", "wall s", "CPU s", "note"], tablefmt="github"))
    print(text)
    return text


# ----------------------------------------------------------------------------------------------------- record
def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("qtool", "torch", "bitsandbytes", "numpy", "transformers", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "?"
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _e2e_rows(e: dict) -> list[tuple]:
    med = statistics.median
    gb = e["input_bytes"] / 1e9
    rows = [(f"read {gb:.2f} GB, cold", f"{med(e['cold_read']):.2f} s / {min(e['cold_read']):.2f} s",
             f"{gb / med(e['cold_read']):.2f} GB/s", ""),
            (f"qtool convert {gb:.2f} GB, cold", f"{med(e['cold_convert']):.2f} s / {min(e['cold_convert']):.2f} s",
             f"{gb / med(e['cold_convert']):.2f} GB/s",
             f"{med(e['cold_convert']) / med(e['cold_read']):.2f}x read (target <= 1.5x); inside convert(): "
             f"{med(e['in_convert_seconds']):.2f} s; CPU {med(e['cpu_seconds']):.1f} s")]
    if e["warm_read"]:
        rows += [(f"read {gb:.2f} GB, warm", f"{med(e['warm_read']):.2f} s / {min(e['warm_read']):.2f} s",
                  f"{gb / med(e['warm_read']):.2f} GB/s", ""),
                 (f"qtool convert {gb:.2f} GB, warm", f"{med(e['warm_convert']):.2f} s / {min(e['warm_convert']):.2f} s",
                  f"{gb / med(e['warm_convert']):.2f} GB/s", f"{med(e['warm_convert']) / med(e['warm_read']):.1f}x read")]
    rows.append((f"peak RSS, {gb:.2f} GB", f"{max(e['peak_rss']) / 2**20:.0f} MiB", "",
                 f"largest tensor {e['largest_tensor_bytes'] / 2**20:.0f} MiB; bound 2 x largest + 512 MiB = "
                 f"{(2 * e['largest_tensor_bytes'] + 512 * 2**20) / 2**20:.0f} MiB"))
    return rows


def write_results(path: Path, first: dict | None, t: dict | None, bnb: dict | None, runs: list[dict],
                  prof: str | None) -> str:
    from tabulate import tabulate

    med = statistics.median
    rows = []
    if first is not None:
        gb = first["input_bytes"] / 1e9
        if "build_s" in first:
            rows.append(("build the C kernels (pip install, or once on first use)", f"{first['build_s']:.2f} s", "",
                         ""))
        rows += [(f"qtool convert SmolLM2-135M ({gb:.2f} GB), first run", f"{first['first']:.2f} s", "",
                  f"kernels: {first['kernels']}; empty kernel caches; inside convert() {first['first_in_convert']:.2f}"
                  f" s; CPU {first['first_cpu']:.1f} s"),
                 (f"qtool convert SmolLM2-135M ({gb:.2f} GB), warm", f"{med(first['warm']):.2f} s / "
                  f"{min(first['warm']):.2f} s", f"{gb / med(first['warm']):.2f} GB/s",
                  f"inside convert() {med(first['warm_in_convert']):.2f} s; CPU {med(first['warm_cpu']):.1f} s")]
    if t is not None:
        n = t["n"]
        rows += [
            ("quantise 8192² fp16, ours", f"{med(t['ours']):.3f} s / {min(t['ours']):.3f} s",
             f"{n / med(t['ours']) / 1e6:.0f} Mparam/s", ""),
            ("quantise 8192² fp16, bitsandbytes CPU", f"{med(t['bnb']):.3f} s / {min(t['bnb']):.3f} s",
             f"{n / med(t['bnb']) / 1e6:.0f} Mparam/s",
             f"ours {t['ratio_median']:.1f}x faster (best {t['ratio_best']:.1f}x; target >= 20x); "
             f"bit-identical: {t['identical']}"),
        ]
    if bnb is not None:
        gb = bnb["input_bytes"] / 1e9
        rows += [(f"qtool convert {gb:.2f} GB (end to end)", f"{med(bnb['convert']):.2f} s / {min(bnb['convert']):.2f} s",
                  f"{gb / med(bnb['convert']):.2f} GB/s",
                  f"inside convert() {med(bnb['in_convert']):.2f} s; CPU {med(bnb['cpu']):.1f} s"),
                 (f"bitsandbytes quantize_4bit, its {bnb['n_quantized']} linear weights only",
                  f"{med(bnb['bnb']):.2f} s / {min(bnb['bnb']):.2f} s", "",
                  f"{bnb['ratio']:.1f}x qtool's end-to-end time (medians; target >= 5x)")]
    for e in runs:
        rows += _e2e_rows(e)
    table = tabulate(rows, headers=["what", "median / best", "throughput", "note"], tablefmt="github")
    v = versions()
    lines = [
        "# Converter speed (bench/convert_speed.py)",
        "",
        f"Run {datetime.datetime.now().isoformat(timespec='minutes')} on {cpu_name()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
        + ", ".join(f"{k} {val}" for k, val in v.items()) + f"; 1-minute load average at the start "
        f"{LOAD_AT_START[0]:.1f}, at the end {os.getloadavg()[0]:.1f} (other work on a shared machine inflates every "
        "time here, ours and bitsandbytes' alike).",
        "",
    ]
    if runs:
        lines += [
            "Checkpoints: synthetic Llama-shaped fp16 ("
            + "; ".join(f"{e['size']}: {e['shape']}, {e['input_bytes'] / 1e9:.2f} GB in {e['n_shards']} shards -> "
                        f"{e['output_bytes'] / 1e9:.2f} GB NF4" for e in runs)
            + "). Convert = wall time of `qtool convert SRC OUT --target cpu --json` in a fresh process (Python "
            "start-up and imports included; kernels built); read = sequential reads of the shards in the benchmark "
            "process. Cold = fsync + POSIX_FADV_DONTNEED on every input file before the run.",
            "",
        ]
    lines += [table, "", "All runs (seconds):", ""]
    if first is not None:
        lines.append(f"- SmolLM2 first run {first['first']:.2f}; warm: {', '.join(f'{x:.2f}' for x in first['warm'])}")
    if t is not None:
        lines += [f"- quantise ours: {', '.join(f'{x:.3f}' for x in t['ours'])}",
                  f"- quantise bitsandbytes: {', '.join(f'{x:.3f}' for x in t['bnb'])}"]
    if bnb is not None:
        lines += [f"- 1.33 GB convert: {', '.join(f'{x:.2f}' for x in bnb['convert'])}",
                  f"- 1.33 GB bitsandbytes quantise-only: {', '.join(f'{x:.2f}' for x in bnb['bnb'])}"]
    for e in runs:
        lines += [f"- {e['size']} cold read: {', '.join(f'{x:.2f}' for x in e['cold_read'])}",
                  f"- {e['size']} cold convert: {', '.join(f'{x:.2f}' for x in e['cold_convert'])} (inside convert(): "
                  f"{', '.join(f'{x:.2f}' for x in e['in_convert_seconds'])}; CPU: "
                  f"{', '.join(f'{x:.1f}' for x in e['cpu_seconds'])})"]
        if e["warm_read"]:
            lines += [f"- {e['size']} warm read: {', '.join(f'{x:.2f}' for x in e['warm_read'])}",
                      f"- {e['size']} warm convert: {', '.join(f'{x:.2f}' for x in e['warm_convert'])}"]
    lines.append("")
    if prof:
        lines += ["Where the time goes (`--profile`):", "", prof.strip(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return table


LOAD_AT_START = os.getloadavg()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="where to put the checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir for the next run")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of each end-to-end measurement")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"which measurements, comma-separated, of {', '.join(CASES)} (default: all)")
    ap.add_argument("--large", action="store_true", help="also cold runs (--reps) on a Llama-2-7B-shaped checkpoint (13.5 GB)")
    ap.add_argument("--profile", action="store_true", help="also profile one cold conversion")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "convert_speed.md")
    args = ap.parse_args()
    cases = set(args.cases.split(","))
    if cases - set(CASES):
        ap.error(f"unknown case(s) {sorted(cases - set(CASES))}; use {', '.join(CASES)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="qtool-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        first = bench_first_run(work, args.reps) if "first-run" in cases else None
        t = bench_tensor(max(3 * args.reps, 9)) if "tensor" in cases else None
        bnb = bench_against_bnb(work, args.reps) if "bnb" in cases else None
        runs = [bench_end_to_end(work, args.reps)] if "e2e" in cases else []
        if args.large:
            runs.append(bench_end_to_end(work, args.reps, "7B", warm=False))
        prof = profile_cold(work, runs[-1]["size"], runs[-1]) if args.profile and runs else None
        table = write_results(args.results, first, t, bnb, runs, prof)
        print()
        print(table)
        print(f"\nwritten to {args.results}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
