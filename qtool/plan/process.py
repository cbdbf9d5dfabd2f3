"""A training process replayed through PyTorch's caching allocator (:mod:`qtool.plan.allocator`), step by step as
:mod:`qtool.plan.trace` lists the tensors: what ``max_memory_reserved`` and NVML see beyond the live tensors. Pure
Python.

qtool (qtool/train/recipe.py on a GPU): the weights and adapters on the default stream; the held-out pass; two
eager warm-up steps on a side stream (their gradients, allocated there, are kept: ``zero_grad(set_to_none=False)``;
clipping and the optimizer's first step, which makes its state, on the default stream); then torch.cuda.graph's
``empty_cache()`` returns every wholly free segment and the capture allocates one micro-batch into the graph's
private pool on the capture stream, which keeps it. Segments that still hold a tensor survive the ``empty_cache``
with their free space: the weights' 20 MiB segments, the side stream's segments holding gradients and its cuBLAS
workspaces. Peak reserved = those + the private pool (+ the default stream's few blocks after the capture).

hf (bench/gpu_worker.py's transformers + PEFT + bitsandbytes): everything on the default stream, no
``empty_cache`` between steps: the cache keeps the segments of every moment of the step, and peak reserved is what
they add up to once the steps repeat.

With ``Settings.expandable`` (``expandable_segments:True``: qtool train's default on CUDA, the others' off) the
same process replays through the expandable allocator: the capture's ``empty_cache`` unmaps every whole free page,
also inside segments that keep tensors, so the survivors' free space is partial pages only, and the graph's pool
maps whole 20 MiB pages instead of segments of its own sizes. Peak reserved can then be the warm-up's pages before
that ``empty_cache`` rather than the end of the capture (``sampled_reserved_bytes`` is the latter). NVML adds nothing
per page: on the H200 probe (bench/results/reserved_probe_h200_2026-12-04.jsonl) ``nvml - memory_reserved`` at the
sampled step ends is the same to the byte with and without expandable segments.

:class:`Process` names what the training process does besides the step: the trainer's revision (the records of
2026-11-29 were made before the held-out pass and with the warm-up's optimizer step on the side stream), how the
weights got onto the GPU (bench/gpu_worker.py builds random ones through fp32 temporaries, then ``empty_cache``),
and the configurations run before in the same process (their cuBLAS workspaces stay, and with them the segments
they sit in).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from qtool.plan.allocator import CachingAllocator
from qtool.plan.resident import DTYPE_BYTES, flat_buffers, frozen_bytes_per_param, nf4_tensor_parts
from qtool.plan.settings import layer_linears
from qtool.plan.trace import QtoolStep, Stream
from qtool.plan.trace_hf import HFStep

if TYPE_CHECKING:
    from qtool.arch import Shape
    from qtool.plan.settings import Settings

TRAINER = "2026-12-04b"  # qtool/train/recipe.py REVISION: the capture on the warm-up's stream, whose two cuBLAS
#                          workspaces it reuses; the held-out pass's workspace given back before the warm-up
EVAL_FIRST_TRAINER = "2026-12-04"  # held-out pass first; warm-up optimizer on the default stream; capture stream own
TRAINERS = (TRAINER, EVAL_FIRST_TRAINER, "2026-11-29")
RECORDED_TRAINER = "2026-11-29"  # the trainer of data/memory/h200-2026-11-29.json: no pass before training, the
#                                  warm-up's clipping and optimizer step on the side stream, an NF4 bias added after
#                                  the product (a separate tensor)
# Steps replayed. The trainer resets the peaks and captures its graph at step 2 (recipe.py measure_after); the bench
# measures hf over steps 2-5. One eager warm-up step stands for qtool's two (the second reuses the first's cache),
# and two hf steps for six (from step 1 on the cache repeats): on every record of data/memory/ the replay gives the
# same peaks either way, at a third or half the cost (a fit search replays ~30 configurations).
QTOOL_WARMUP_STEPS = 1
HF_STEPS, HF_MEASURED_FROM = 2, 1


@dataclass(frozen=True)
class Process:
    """What the process does besides the planned step. ``earlier``: configurations (same model) run before it."""

    trainer: str = TRAINER
    random_weights: bool = False
    earlier: tuple[Settings, ...] = ()


@dataclass(frozen=True)
class Replay:
    """The allocator's counters for the planned configuration (the last of the process)."""

    peak_allocated_bytes: int
    peak_reserved_bytes: int
    sampled_reserved_bytes: int  # memory_reserved at NVML's sample points (ends of the measured steps)
    resident_slack_bytes: int    # reserved - allocated when the measured steps begin: free space in kept segments
    after_load_allocated_bytes: int
    after_load_reserved_bytes: int
    # qtool: reserved bytes per pool after the measured steps (a stream's, or ("graph", k) the CUDA graph's private
    # pool), as torch.cuda.memory_snapshot() groups its segments
    pool_bytes: tuple[tuple[object, int], ...] = ()


def traced_settings(st: Settings) -> Settings:
    """The configuration the trace follows: LoRA on the layer Linears (AdaLoRA's init rank as LoRA's; adapters,
    prefix and vocabulary LoRA untraced: the step of the plain model), one micro-batch per step."""
    if st.method == "adalora":
        return replace(st, method="lora", target_rank=None)
    return st


@functools.lru_cache(maxsize=256)  # a plan and its record's replays ask for the same process more than once
def replay(shape: Shape, st: Settings, process: Process = Process()) -> Replay:
    """Replay ``process`` ending with ``st`` on ``shape`` (a GPU plan: ``st.device == "cuda"``)."""
    runs = [traced_settings(s) for s in (*process.earlier, st)]
    # PYTORCH_CUDA_ALLOC_CONF is read once per process: the planned configuration's setting holds for all its runs
    allocator, workspaces = CachingAllocator(expandable=st.expandable), {}
    default = Stream(allocator, "default", workspaces=workspaces)
    if st.is_hf:
        _load_hf(default, shape, runs[0], process.random_weights)
        return _hf_runs(allocator, default, shape, runs)
    _load_qtool(default, shape, runs[0], process.random_weights)
    return _qtool_runs(allocator, default, shape, runs, process.trainer)


def _load_qtool(mem: Stream, shape: Shape, st: Settings, random_weights: bool) -> None:
    """qtool/train/load.py build_decoder, layer by layer: each Linear's packed weight, absmax and nested absmax, its
    bias, the norms; embeddings, head, final norm, RoPE frequencies. From a checkpoint each tensor arrives as it is;
    random_decoder (the bench) draws the 16-bit ones in fp32 first (randn, then * 0.02, then the cast)."""
    cb = DTYPE_BYTES[st.compute_dtype]

    def dense(n: int) -> None:
        if random_weights:
            drawn, scaled = mem.new(4 * n), mem.new(4 * n)
            mem.drop(drawn)
            mem.new(cb * n)
            mem.drop(scaled)
        else:
            mem.new(cb * n)

    for _ in range(shape.n_layers):
        for lin in layer_linears(shape):
            for n_bytes in nf4_tensor_parts(lin.n_in * lin.n_out, st.block_size, st.double_quant, code_tables=False):
                mem.new(n_bytes)
            if lin.bias:
                dense(lin.n_out)
        for _ in range(shape.n_norms_per_layer):
            dense(shape.hidden)
    for _ in range(1 if shape.tied_embeddings else 2):
        dense(shape.vocab * shape.hidden)
    dense(shape.hidden)
    mem.new(4 * shape.rotary_dim // 2)
    if random_weights:
        mem.allocator.empty_cache()  # bench/gpu_worker.py cleanup() before the first configuration


def _load_hf(mem: Stream, shape: Shape, st: Settings, random_weights: bool) -> None:
    """bench/gpu_worker.py build_hf: each Linear4bit's QuantState tensors (packed, absmax, nested absmax, codes,
    offset) and bias; the other parameters in bf16 (random ones drawn through a bf16 temporary), RoPE frequencies
    (two copies); then prepare_model_for_kbit_training casts every non-4-bit parameter to fp32, one by one."""
    cb, fb = DTYPE_BYTES[st.compute_dtype], frozen_bytes_per_param(st)
    bf16 = []
    for _ in range(shape.n_layers):
        for lin in layer_linears(shape):
            for n_bytes in nf4_tensor_parts(lin.n_in * lin.n_out, st.block_size, st.double_quant):
                mem.new(n_bytes)
            if lin.bias:
                bf16.append((mem.new(cb * lin.n_out), lin.n_out))

    def param(n: int, drawn: bool) -> None:
        tmp = mem.new(cb * n) if drawn and random_weights else None
        bf16.append((mem.new(cb * n), n))
        mem.drop(tmp)

    param(shape.vocab * shape.hidden, True)
    for _ in range(shape.n_layers * shape.n_norms_per_layer + 1):
        param(shape.hidden, False)
    if not shape.tied_embeddings:
        param(shape.vocab * shape.hidden, True)
    mem.new(4 * shape.head_dim // 2)
    mem.new(4 * shape.head_dim // 2)
    if fb != cb:
        for block, n in bf16:
            mem.new(fb * n)
            mem.drop(block)


def _qtool_runs(allocator: CachingAllocator, default: Stream, shape: Shape, runs: list[Settings],
                trainer: str) -> Replay:
    recorded = trainer == RECORDED_TRAINER
    for k, st in enumerate(runs):
        allocator.empty_cache()  # a fresh process has nothing to return; the bench's cleanup() between runs
        step = QtoolStep(shape, st)
        step.recorded_trainer = recorded
        step.attach(default)
        after = allocator.allocated_bytes, allocator.reserved_bytes
        side = Stream(allocator, ("side", k), workspaces=default.workspaces)
        shared = trainer == TRAINER  # captured on the warm-up's stream: the same (stream, thread) workspaces
        graph = Stream(allocator, ("side", k) if shared else "capture", pool=("graph", k),
                       workspaces=default.workspaces)
        if not recorded:
            step.evaluate(default)
        if shared:  # torch._C._cuda_clearCublasWorkspaces() before the warm-up: the held-out pass's goes back
            for key in [key for key in default.workspaces if key[0] == "default"]:
                default.drop(default.workspaces.pop(key))
        if flat_buffers(st):
            step.flatten(default)
        for i in range(QTOOL_WARMUP_STEPS):
            ids = side.new(8 * step.T)
            step.step(side)
            optimizer = side if recorded else default
            step.clip_and_step(optimizer)
            if i == 0:
                step.optimizer_state(optimizer)
            side.drop(ids)
        allocator.reset_peaks()
        static_ids = default.new(8 * step.T)
        allocator.empty_cache()  # torch.cuda.graph.__enter__
        resident_slack = allocator.reserved_bytes - allocator.allocated_bytes
        step.step(graph)  # the capture: one micro-batch into the graph's private pool
        samples = []
        for _ in range(4):  # steps 2-5: replays allocate nothing; clipping and the step on the default stream
            step.clip_and_step(default)
            samples.append(allocator.reserved_bytes)
        pools = tuple((name, allocator.segment_bytes(name)) for name in ("default", ("side", k), ("graph", k)))
        result = Replay(allocator.peak_allocated_bytes, allocator.peak_reserved_bytes, max(samples), resident_slack,
                        *after, pool_bytes=pools)
        step.evaluate(default)  # the held-out pass after training (its cuBLAS workspace stays)
        step.detach(default)
        default.drop(static_ids)
    return result


def _hf_runs(allocator: CachingAllocator, default: Stream, shape: Shape, runs: list[Settings]) -> Replay:
    held: list = []
    for st in runs:
        allocator.empty_cache()
        step = HFStep(shape, st)
        step.attach(default)
        after = allocator.allocated_bytes, allocator.reserved_bytes
        samples = []
        for i in range(HF_STEPS):
            if i == HF_MEASURED_FROM:
                allocator.reset_peaks()
                resident_slack = allocator.reserved_bytes - allocator.allocated_bytes
            kept = step.step(default, keep=i == HF_STEPS - 1)
            if i == 0:  # rebinding `loss` frees what the previous run's graph held
                default.drop(*held)
                held = []
            step.clip_and_step(default)
            if i == 0:
                step.optimizer_state(default)
            default.drop(*step.grads.values())  # zero_grad(set_to_none=True)
            step.grads = {}
            if i >= HF_MEASURED_FROM:
                samples.append(allocator.reserved_bytes)
        result = Replay(allocator.peak_allocated_bytes, allocator.peak_reserved_bytes, max(samples), resident_slack,
                        *after)
        # the worker's `loss` still references the last graph: its LoRA factors and two hidden states
        held = kept + step.detach(default, keep_factors=True)
    return result
