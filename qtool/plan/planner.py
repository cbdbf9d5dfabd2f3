"""``qtool plan``: GPU memory of one QLoRA training step, every byte on a named row. Pure Python: no torch, no numpy.

    peak = persistent (weights, adapters, optimizer state, workspaces) + the largest transient phase

The phases are the loss backward (saved activations + the head's fp32 logits work), the final norm's backward, the
backward of the last decoder layer (saved or recomputed activations + its gradient transients + a dequantised
weight), for eager steps the backward of the first decoder layer (one layer's activations but every other layer's
fresh gradients) and the optimizer step. Allocated is what ``torch.cuda.max_memory_allocated`` reports, reserved
adds the caching allocator's slack, NVML adds the CUDA context and bitsandbytes' paged (managed) optimizer buffers.
The line items and their sources are in :mod:`qtool.plan.resident` (resident) and :mod:`qtool.plan.transient`
(transient); the measured constants are at the top of the first, and data/memory/README.md says how each was read
off the records.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from qtool.arch import Shape, shape_from_config
from qtool.errors import UsageError
from qtool.plan import fsdp, methods, notes, offload, unsloth
from qtool.plan import resident as items
from qtool.plan.process import EVAL_FIRST_TRAINER, RECORDED_TRAINER, TRAINER, TRAINERS, Process, replay
from qtool.plan import transient as acts
from qtool.plan import vocab
from qtool.plan.rows import Row
from qtool.plan.settings import (ATTENTIONS, BLOCKSIZES, DEVICES, DTYPES, LOSSES, OPTIMIZERS, PROFILES,  # noqa: F401
                                 RECIPES, TARGET_PRESETS, Settings, gpus_problems, layer_linears)
from qtool.units import MiB, parse_size

KNOBS = ("seq_len", "batch_size", "rank")
_LIMITS = {"seq_len": 1 << 22, "batch_size": 1 << 16}

# NVML total memory of common GPUs (nvidia-smi "Total", MiB). The fit table shows the first six.
GPUS = {"RTX 4090": 24564, "A100-40GB": 40960, "L40S": 46068, "A100-80GB": 81920, "H100-80GB": 81559,
        "H200": 143771, "RTX 3090": 24576, "L4": 23034, "A10": 23028, "RTX A6000": 49140, "T4": 15360}
FIT_TABLE_GPUS = ("RTX 4090", "A100-40GB", "L40S", "A100-80GB", "H100-80GB", "H200")


@dataclass(frozen=True)
class Plan:
    shape: Shape
    settings: Settings
    rows: tuple[Row, ...]
    peak_phase: str
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    peak_nvml_bytes: int
    after_load_allocated_bytes: int
    fp16_weights_bytes: int
    nf4_weights_bytes: int
    weights_4bit_total_bytes: int
    n_trainable: int
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("shape", "settings", "rows")}
        out["rows"] = [asdict(row) for row in self.rows]
        out["shape"] = {k: v for k, v in asdict(self.shape).items()}
        out["settings"] = asdict(self.settings)
        out["notes"] = list(self.notes)
        return out


def plan(shape: Shape, settings: Settings, process: Process = Process(), allocator_replay: bool = True) -> Plan:
    """The memory plan of one training step of ``settings`` on ``shape``, in a process that does what ``process``
    says besides (by default: ``qtool train`` or a transformers script, fresh, the model loaded from a checkpoint).
    ``allocator_replay=False`` leaves out the allocator's slack (reserved = allocated): a fit search's cheap probe.
    Raises UsageError on bad input."""
    st = settings.check(shape)
    if st.gpus > 1:
        return _per_gpu_plan(shape, st)
    if st.profile == "unsloth":
        return _unsloth_plan(shape, st)
    n_params = shape.declared_params or shape.n_params()
    packed, meta, quant_alloc = items.quantised_weights(shape, st)
    emb, head = items.embedding_bytes(shape, st)
    norms = items.norm_and_bias_bytes(shape, st)
    rounding = items.resident_rounding_bytes(shape, st)
    numels = (items.lora_tensors(shape, st) if st.method in ("lora", "adalora")
              else methods.trainable_tensors(shape, st))
    what = methods.label(st)
    param_bytes = items.DTYPE_BYTES[st.adapter_dtype]
    # qtool's CUDA-graph trainer moves parameters and gradients into one buffer each (qtool/train/flat.py): the
    # optimizer sees one tensor, so a paged optimizer pages all of its state
    buffers = [sum(numels)] if items.flat_buffers(st) and numels else numels
    lora = items.tensors_alloc(buffers, param_bytes)
    opt_device, opt_paged = items.optimizer_state_bytes(buffers, st.optimizer, param_bytes)
    frozen = "fp32" if items.frozen_bytes_per_param(st) == 4 else st.compute_dtype
    n_workspaces = items.cublas_workspaces(st, process.trainer)
    if st.grad_accum > 1:
        grads = [Row(f"{what} gradients, accumulated over {st.grad_accum} micro-batches", lora)]
    elif items.gradients_persist(st):
        grads = [Row(f"{what} gradients (allocated before the CUDA graph capture, kept)", lora)]
    elif st.method == "adalora":  # its orthogonality term is back-propagated first: all P, Q gradients at once
        grads = [Row("AdaLoRA gradients (the regulariser's backward makes them before the layers')", lora)]
    else:
        grads = []
    adalora = st.method == "adalora"
    persistent = [
        Row("NF4 weights and quantisation constants", quant_alloc),
        Row(f"embeddings ({frozen})", emb),
        *([Row(f"lm_head ({frozen})", head)] if head else []),
        Row(f"norms and biases ({frozen})", norms),
        Row(f"{what} ({sum(numels):,} params, {st.adapter_dtype})", lora),
        *([Row("AdaLoRA importance EMAs (sensitivity, uncertainty; fp32)", items.adalora_ema_bytes(numels))]
          if adalora else []),
        *([Row("LoRA initial factors, frozen (symmetric init: the offset -s·B0·A0)", lora)]
          if st.init == "symmetric" else []),
        *([Row("allocator rounding of the resident tensors (unsplit large blocks)", rounding)] if rounding else []),
        Row(f"optimizer state ({st.optimizer}) on device", opt_device),
        *([Row("optimizer state, paged (managed memory)", opt_paged, "paged", "nvml")] if opt_paged else []),
        *([Row(offload.HOST_ROW, offload.host_bytes(shape, st), "host", "none")] if st.offload_activations else []),
        *([Row(f"cuBLAS workspaces ({n_workspaces} x {items.CUBLAS_WORKSPACE_BYTES // MiB} MiB)",
               n_workspaces * items.CUBLAS_WORKSPACE_BYTES)] if n_workspaces else []),
        *grads,
    ]
    return _assemble(shape, st, persistent, _phases(shape, st, lora, numels, buffers),
                     lambda allocated, working: _overhead_rows(shape, st, process, opt_paged > 0, allocator_replay,
                                                               allocated),
                     after_load_allocated_bytes=quant_alloc + emb + head + norms + lora + rounding,
                     fp16_weights_bytes=items.fp16_bytes(n_params), nf4_weights_bytes=packed + meta,
                     weights_4bit_total_bytes=packed + meta + emb + head + norms,
                     n_trainable=sum(numels), notes=tuple(notes.plan_notes(shape, st)))


def _assemble(shape: Shape, st: Settings, persistent: list[Row], phases: dict[str, tuple[list[Row], list[Row]]],
              overhead_rows: Callable[[int, int], list[Row]], **totals) -> Plan:
    """The plan from its persistent rows and candidate phases: the peak phase is the one with the most bytes; on CUDA
    ``overhead_rows(peak allocated, working bytes of the peak phase)`` (the allocator's slack, the CUDA context) on
    top."""
    phase = max(phases, key=lambda k: sum(r.bytes for r in phases[k][0] + phases[k][1]))
    kept, working = phases[phase]
    transient = kept + working
    allocated = sum(r.bytes for r in persistent + transient if r.counter == "allocated")
    overheads = overhead_rows(allocated, sum(r.bytes for r in working)) if st.device == "cuda" else []
    rows = tuple(persistent + transient + overheads)
    return Plan(
        shape=shape, settings=st, rows=rows, peak_phase=phase,
        peak_allocated_bytes=allocated,
        peak_reserved_bytes=sum(r.bytes for r in rows if r.counter in ("allocated", "reserved")),
        peak_nvml_bytes=sum(r.bytes for r in rows if r.counter in ("allocated", "reserved", "nvml")), **totals)


def _per_gpu_plan(shape: Shape, st: Settings) -> Plan:
    """``--gpus N > 1``: one rank's plan under FSDP2 (:mod:`qtool.plan.fsdp`): its shards of the parameters, gradients
    and optimizer state; the one-GPU activation phases at the per-GPU batch, each with FSDP's unsharded parameters and
    communication buffers of that moment. The allocator's slack is not replayed under FSDP: it is estimated as the
    working bytes of the peak phase (:data:`qtool.plan.fsdp.SLACK_FRACTION`), unvalidated."""
    numels = items.lora_tensors(shape, st)
    local = fsdp.local_trainable_numels(shape, st)
    # the eager step frees its gradients (zero_grad(set_to_none=True)): the phases hold the sharded ones
    phases = _phases(shape, replace(st, batch_size=st.per_gpu_batch), fsdp.sharded_grads_bytes(shape, st), local, local)
    extra = fsdp.phase_rows(shape, st)
    phases = {name: (kept + extra[name][0], working + extra[name][1]) for name, (kept, working) in phases.items()}
    phases.update(fsdp.forward_phases(shape, st))
    persistent = fsdp.persistent_rows(shape, st, f"LoRA adapters ({sum(numels):,} params, {st.adapter_dtype})")
    packed, meta, _ = items.quantised_weights(shape, st)
    emb, head = items.embedding_bytes(shape, st)
    paged = any(r.where == "paged" for r in persistent)
    return _assemble(shape, st, persistent, phases,
                     lambda allocated, working: [Row(fsdp.SLACK_ROW, int(fsdp.SLACK_FRACTION * working),
                                                     counter="reserved")]
                     + _overhead_rows(shape, st, Process(), paged, False, allocated),
                     after_load_allocated_bytes=fsdp.after_load_bytes(shape, st),
                     fp16_weights_bytes=items.fp16_bytes(shape.declared_params or shape.n_params()),
                     nf4_weights_bytes=packed + meta,
                     weights_4bit_total_bytes=packed + meta + emb + head + items.norm_and_bias_bytes(shape, st),
                     n_trainable=sum(numels), notes=tuple(notes.plan_notes(shape, st) + fsdp.notes(shape, st)))


def _unsloth_plan(shape: Shape, st: Settings) -> Plan:
    """``--profile unsloth`` (:mod:`qtool.plan.unsloth`): its persistent rows and phases, its own overheads."""
    numels = items.lora_tensors(shape, st)
    persistent = unsloth.persistent_rows(shape, st, numels)
    packed, meta, _ = items.quantised_weights(shape, st)
    emb, head = items.embedding_bytes(shape, st)
    return _assemble(shape, st, persistent, unsloth.phases(shape, st, numels),
                     lambda allocated, working: unsloth.overhead_rows(
                         allocated - sum(r.bytes for r in persistent if r.counter == "allocated")),
                     after_load_allocated_bytes=unsloth.after_load_bytes(persistent),
                     fp16_weights_bytes=items.fp16_bytes(shape.declared_params or shape.n_params()),
                     nf4_weights_bytes=packed + meta,
                     weights_4bit_total_bytes=packed + meta + emb + head + items.norm_and_bias_bytes(shape, st),
                     n_trainable=sum(numels), notes=tuple(notes.plan_notes(shape, st)))


def _overhead_rows(shape: Shape, st: Settings, process: Process, paged: bool, replayed: bool,
                   allocated: int) -> list[Row]:
    """What reserved and NVML add to the live tensors. The allocator's slack is replayed (qtool/plan/process.py):
    the free space of segments that tensors made before the step keep (qtool: after torch.cuda.graph's
    empty_cache, beside the weights, gradients, optimizer state and cuBLAS workspaces; hf: beside the loaded model),
    and the rest of the cached segments at the peak beyond the live bytes. The replay runs at
    :func:`replayed_seq_len` and its slack is scaled by allocated bytes, so that the plan grows with the sequence
    between replayed lengths (a fit search then replays a few lengths, not each one it probes)."""
    rows = []
    if replayed:
        run = replay(shape, replace(st, seq_len=replayed_seq_len(st.seq_len)), process)
        scale = allocated / run.peak_allocated_bytes
        slack = max(0, run.peak_reserved_bytes - run.peak_allocated_bytes)
        kept = min(slack, run.resident_slack_bytes)
        where = "weights, gradients, optimizer state, cuBLAS workspaces" if st.stack == "qtool" else "the loaded model"
        step = "the CUDA graph's private pool" if items.fused(st) else "the step's cached segments"
        rows += [Row(f"allocator: free space in segments kept by tensors made before the step ({where})",
                     round(kept * scale), counter="reserved"),
                 Row(f"allocator: {step} beyond the live tensors at the peak", round((slack - kept) * scale),
                     counter="reserved")]
    rows += [Row("CUDA context, kernels and driver reservation", items.CUDA_CONTEXT_BYTES[st.stack], counter="nvml"),
             Row("paged (managed) memory's unexplained extra in NVML", items.PAGED_OVERHEAD_BYTES if paged else 0,
                 where="paged", counter="nvml")]
    return [row for row in rows if row.bytes]


def replayed_seq_len(seq_len: int) -> int:
    """The sequence length whose allocator replay stands for ``seq_len``: the largest of 2^k, 2^k·9/8, ..., 2^k·15/8
    not above it (every power of two and most round lengths are their own)."""
    if seq_len < 16:
        return seq_len
    top = 1 << (seq_len.bit_length() - 1)
    return top + (seq_len - top) // (top // 8) * (top // 8)


def _phases(shape: Shape, st: Settings, lora_bytes: int, numels: list[int],
            buffers: list[int] | None = None) -> dict[str, tuple[list[Row], list[Row]]]:
    """Candidate transient phases as (tensors saved for backward, working tensors of the moment); the plan's peak is
    the phase with the most bytes. Eager steps free the gradients (zero_grad(set_to_none=True)), so they appear in
    the last layer's backward (its MLP's) and in the step; where they persist (accumulation, CUDA graphs) they are
    persistent rows instead. ``buffers``: the tensors the optimizer sees (``numels``, or their flat buffer)."""
    buffers = numels if buffers is None else buffers
    n = shape.n_layers
    # AdaLoRA's regulariser (added after the loss, so back-propagated first) allocates the gradients of every P and Q
    # before the layers' backward: they are a persistent row then (planned with the regulariser on, its default)
    grads_now = not items.gradients_persist(st) and st.method != "adalora"
    positions = Row("rotary cos/sin" + ("" if items.fused(st) else " and position ids"),
                    acts.position_bytes(shape, st))
    if st.grad_checkpointing:
        mask = acts.mask_bytes(shape, st)
        mask_rows = [Row("attention mask", mask)] if mask else []
        layer = [Row("recomputed layer's saved tensors", acts.recompute_bytes(shape, st))]
        output = acts.reentrant_output_bytes(shape, st)  # hf-prepare: the whole layer reruns
        layer += [Row("recomputed layer's output (reentrant checkpointing)", output)] if output else []
        if st.offload_activations:  # the inputs are a host row (persistent); on the GPU only those in flight
            kept = mask_rows
            first_kept = [*kept, *layer, *(Row(*r) for r in offload.backward_rows(shape, st, first=True))]
            layer += [Row(*r) for r in offload.backward_rows(shape, st)]
        else:
            kept = [Row(f"checkpointed inputs of {n} layers", acts.checkpoint_bytes(shape, st)), *mask_rows]
            first_kept = [Row("checkpointed input of layer 0", acts.checkpoint_bytes(shape, st) // n), *mask_rows,
                          *layer]
    else:
        kept = [Row(f"activations saved by {n} layers", acts.layers_saved_bytes(shape, st))]
        layer = []
        first_kept = [Row("activations saved by layer 0", acts.layer_saved_bytes(shape, st, first=True))]
        window = acts.window_mask_bytes(shape, st)  # qtool's (s, s) window mask, shared by the saved graph
        kept += [Row("sliding-window mask (bool, s x s)", window)] if window else []
        first_kept += kept[1:]
    extra = [Row(name, n) for name, n in methods.kept_bytes(shape, st)]
    embed_saved = [Row("input-embedding LoRA (embed_tokens): token rows of A (saved)", vocab.embed_saved_bytes(shape, st))]
    extra += [r for r in embed_saved if r.bytes]
    kept, first_kept = kept + extra, first_kept + extra
    n_loss = acts.loss_tokens(st)
    head_saved = [r for r in (Row("head LoRA (lm_head): h·Aᵀ, B and A in the compute dtype (saved)",
                                  vocab.head_saved_bytes(shape, st, n_loss)),) if r.bytes]
    backward, moment = acts.layer_backward_bytes(shape, st)
    mlp_grads = acts.layer_grad_bytes(shape, st) + methods.mlp_grad_bytes(shape, st)
    loss_name = "logits and cross-entropy (fp32, " + ("chunked)" if st.loss == "chunked" else "full)")
    tokens_h = acts.widths(st)[0] * shape.hidden * st.batch_size * st.seq_len
    step = [row for row in (
        Row(f"{methods.label(st)} gradients", lora_bytes if grads_now else 0),
        Row("optimizer step temporaries", items.optimizer_step_bytes(
            buffers, st.optimizer, items.DTYPE_BYTES[st.adapter_dtype]))) if row.bytes]
    return {
        "loss backward": (kept + [Row("final norm and loss inputs (saved)", acts.head_saved_bytes(shape, st)),
                                  *head_saved, positions],
                          [Row(loss_name, acts.loss_bytes(shape, st)),
                           *[r for r in (Row("head LoRA (lm_head) gradients in the loss backward (B's fp32 sum, h·Aᵀ's)",
                                             vocab.head_loss_bytes(shape, st, n_loss)),) if r.bytes]]),
        # hf: PEFT's head LoRA adds two logits-sized fp32 tensors to the base logits in the forward
        **({"head LoRA (lm_head) forward": (kept + [Row("final norm (saved)", acts.final_norm_saved_bytes(shape, st)),
                                             *head_saved, positions],
                                     [Row("logits, the head LoRA's output and its scaled copy (fp32)",
                                          vocab.head_forward_bytes(shape, st))])}
           if vocab.head_forward_bytes(shape, st) else {}),
        # the embedding's LoRA is back-propagated last, beside every other adapter gradient
        **({"input-embedding LoRA (embed_tokens) backward": (embed_saved, [row for row in (
            Row(f"{methods.label(st)} gradients", lora_bytes if grads_now else 0),
            Row("input-embedding LoRA backward: row gradients and A's dense gradient",
                vocab.embed_backward_bytes(shape, st))) if row.bytes])}
           if vocab.embed_backward_bytes(shape, st) else {}),
        "final norm backward": (kept + [Row("final norm (saved)", acts.final_norm_saved_bytes(shape, st)), positions],
                                [Row("final norm backward: incoming grad and temporaries",
                                     acts.norm_backward_bytes(shape, st) + tokens_h)]),
        "backward of the last decoder layer": (kept + layer + [positions], [
            Row(f"backward transient: {moment}", backward),
            *([Row(f"{methods.label(st)} gradients of its MLP", mlp_grads)] if grads_now and mlp_grads else [])]),
        "optimizer step": ([], step),
        # AdaLoRA: the sensitivity of every element at once, beside the gradients, just before the step
        **({"AdaLoRA importance update": ([], [row for row in (
            Row("LoRA gradients", lora_bytes if grads_now else 0),
            Row("AdaLoRA sensitivity |w·∂L/∂w| (fp32)", items.adalora_update_bytes(numels))) if row.bytes])}
           if st.method == "adalora" else {}),
        # back-propagated last, layer 0 holds one layer's activations but the fresh gradients of all the others
        **({"backward of the first decoder layer": (first_kept + [positions], [
            Row(f"backward transient: {moment}", backward),
            Row(f"{methods.label(st)} gradients of layers 1-{n - 1} and of layer 0's MLP",
                lora_bytes * (n - 1) // n + mlp_grads)])} if grads_now and n > 1 else {}),
    }


def capacity_bytes(text: str) -> tuple[str, int]:
    """(label, bytes) for a size or a GPU name from GPUS (case and punctuation ignored). Sizes say their unit:
    '24GB' is 24 * 10**9 bytes, '24GiB' (or '24Gi') 24 * 2**30 bytes; a bare number is bytes."""
    key = "".join(c for c in text.lower() if c.isalnum())
    for name, mib in GPUS.items():
        if "".join(c for c in name.lower() if c.isalnum()) == key:
            return name, mib * MiB
    try:
        return text, parse_size(text)
    except ValueError:
        from difflib import get_close_matches  # an error path: not paid at start-up

        close = get_close_matches(text, list(GPUS), n=3, cutoff=0.4)
        raise UsageError(f"--fit {text!r} is neither a size (24GB = 24e9 bytes, 24GiB = 24 x 2^30 bytes) nor a "
                         "known GPU" + (f"; did you mean {', '.join(close)}?" if close else f" ({', '.join(GPUS)})")
                         ) from None


def fits(p: Plan, capacity: int) -> bool:
    """A plan fits when everything the GPU must hold (NVML-used at the peak) is within its memory."""
    return p.peak_nvml_bytes <= capacity


def knob_limit(shape: Shape, settings: Settings, knob: str) -> tuple[int, str]:
    """The largest value :func:`largest_fitting` considers for ``knob``, and why (a phrase that reads after "the").
    A seq-len stops at the model's position limit (config.json's max_position_embeddings: no more positions were
    trained, and absolute position embeddings have no more rows); a sliding window is no limit (both trainers apply
    it with a mask; a prefix is bounded by :func:`qtool.plan.methods.seq_len_bound`). A rank stops at min(in, out)
    of the smallest targeted module; a batch at the search bound."""
    st = settings.check(shape)
    if knob == "rank" and not st.module_ranks(shape):
        raise UsageError(f"--solve rank: --method {st.method} has no rank",
                         hint="solve for seq-len or batch-size, or plan --method lora")
    if knob == "rank":
        lins = {lin.name: lin for lin in layer_linears(shape)}
        name = min(st.module_ranks(shape), key=lambda n: min(lins[n].n_in, lins[n].n_out))
        return min(lins[name].n_in, lins[name].n_out), f"min(in, out) of {name}"
    if knob == "seq_len" and methods.seq_len_bound(shape, st) is not None:
        value, why = methods.seq_len_bound(shape, st)
        return (value, why) if value < _LIMITS[knob] else (_LIMITS[knob], "search bound")
    if knob == "seq_len":
        if shape.max_positions < _LIMITS[knob]:
            return shape.max_positions, f"max_position_embeddings of {shape.name}"
    return _LIMITS[knob], "search bound"


@dataclass(frozen=True)
class Fit:
    knob: str
    capacity_bytes: int
    value: int | None      # the largest value that fits, None if even 1 does not
    plan: Plan | None      # the plan at that value
    limited: bool = False  # the value is the search's upper bound (knob_limit): memory might allow more
    limit: int = 0         # that bound ...
    limit_reason: str = ""  # ... and why (knob_limit)
    step: int = 1          # the values searched are multiples of it: a global batch over --gpus N steps by N


def largest_fitting(shape: Shape, settings: Settings, capacity: int, knob: str = "seq_len") -> Fit:
    """The largest ``knob`` (seq_len, batch_size or rank) whose plan fits ``capacity``, others fixed, up to
    :func:`knob_limit` (a seq-len never beyond the model's position limit).
    Line items are non-decreasing in each knob, so an exponential then binary search is exact. (One exception: an hf
    Mistral's attention drops its s^2 term at the sliding window, where transformers switches kernels; the search
    still returns a value that fits while value + 1 does not, and memory grows again beyond the window.)
    With ``--gpus N`` the batch is the global one, so it is searched in multiples of N (the per-GPU batch)."""
    if knob not in KNOBS:
        raise UsageError(f"cannot solve for {knob!r}; choose one of {', '.join(KNOBS)}")
    st = settings.check(shape)
    step = st.gpus if knob == "batch_size" else 1
    limit, why = knob_limit(shape, st, knob)
    fit = _search(_plans_along(shape, st, knob, step), capacity, knob, limit // step, why)
    if step == 1:
        return fit
    return replace(fit, value=None if fit.value is None else fit.value * step, limit=limit // step * step, step=step)


class _Along:
    """Plans along one knob, others fixed, memoised (a fit table searches the same values for every GPU). ``at(v)``
    is the plan; ``fits_roughly(v, capacity)`` judges it without replaying the allocator (``allocator_replay=False``)
    but with the slack, as a fraction of allocated, of the nearest value replayed so far: a search probes ~30 values
    and replays only those near its answer. Values count in units of ``step`` (the plan's knob is value x step)."""

    def __init__(self, shape: Shape, st: Settings, knob: str, step: int = 1):
        self.shape, self.st, self.knob, self.step = shape, st, knob, step
        self.exact: dict[int, Plan] = {}
        self.rough: dict[int, Plan] = {}

    def _settings(self, value: int) -> Settings:
        return replace(self.st, **{self.knob: value * self.step}, alpha=None if self.knob == "rank" else self.st.alpha)

    def __call__(self, value: int) -> Plan:
        if value not in self.exact:
            self.exact[value] = plan(self.shape, self._settings(value))
        return self.exact[value]

    def fits_roughly(self, value: int, capacity: int) -> bool:
        if value not in self.rough:
            self.rough[value] = plan(self.shape, self._settings(value), allocator_replay=False)
        self(max(1, getattr(self.st, self.knob) // self.step))  # the asked value's plan: the first slack known
        nearest = self.exact[min(self.exact, key=lambda v: abs(v - value))]
        slack = (nearest.peak_reserved_bytes - nearest.peak_allocated_bytes) / nearest.peak_allocated_bytes
        rough = self.rough[value]
        return rough.peak_nvml_bytes + slack * rough.peak_allocated_bytes <= capacity


def _plans_along(shape: Shape, st: Settings, knob: str, step: int = 1) -> _Along:
    return _Along(shape, st, knob, step)


def _search(at: _Along, capacity: int, knob: str, limit: int, why: str) -> Fit:
    """The largest value that fits: exponential then binary search on rough judgements (:class:`_Along`), then
    exact plans from there: down while the value does not fit, up while the next one does."""
    if not fits(at(1), capacity):
        return Fit(knob, capacity, None, None, limit=limit, limit_reason=why)
    lo = 1
    while lo < limit and at.fits_roughly(min(2 * lo, limit), capacity):
        lo = min(2 * lo, limit)
    hi = min(2 * lo, limit + 1)  # the first value judged not to fit (or one past the limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at.fits_roughly(mid, capacity) else (lo, mid)
    lo, hi = _exact_boundary(at, capacity, lo, limit)
    return Fit(knob, capacity, lo, at(lo), limited=lo == limit, limit=limit, limit_reason=why)


def _exact_boundary(at: _Along, capacity: int, guess: int, limit: int) -> tuple[int, int]:
    """(lo, hi): lo fits exactly, hi = lo + 1 does not (or is past ``limit``), galloping from ``guess``."""
    if fits(at(guess), capacity):
        lo, step = guess, 1
        while lo < limit and fits(at(min(lo + step, limit)), capacity):
            lo, step = min(lo + step, limit), 2 * step
        hi = min(lo + step, limit + 1)
    else:
        hi, step = guess, 1
        while hi - step > 1 and not fits(at(hi - step), capacity):
            hi, step = hi - step, 2 * step
        lo = max(1, hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(at(mid), capacity) else (lo, mid)
    return lo, hi


def fit_table(shape: Shape, settings: Settings, gpus: tuple[str, ...] = FIT_TABLE_GPUS) -> list[dict]:
    """Per GPU: does this plan fit, with what headroom, and the largest seq-len that fits at this batch size
    (``max_seq_len_limited``: it is :func:`knob_limit`'s bound, not the memory's)."""
    st = settings.check(shape)
    p, at, limit = plan(shape, st), _plans_along(shape, st, "seq_len"), knob_limit(shape, st, "seq_len")
    table = []
    for name in gpus:
        capacity = GPUS[name] * MiB
        best = _search(at, capacity, "seq_len", *limit)
        table.append({"gpu": name, "memory_bytes": capacity, "fits": fits(p, capacity),
                      "headroom_bytes": capacity - p.peak_nvml_bytes, "max_seq_len": best.value,
                      "max_seq_len_limited": best.limited})
    return table


def gpu_counts(shape: Shape, settings: Settings, gpus: tuple[str, ...] = FIT_TABLE_GPUS,
               counts: tuple[int, ...] = fsdp.GPU_COUNTS) -> dict:
    """``--fit-gpus``: the per-GPU plan at each count of ``counts`` (FSDP2; ``settings.batch_size`` is the global
    batch, so a count that does not divide it is not planned), and per GPU of ``gpus`` the smallest count whose
    per-GPU peak fits it (None if none does). Counts are tried in order: per-GPU memory need not fall with the count
    (NCCL's buffers come with the second GPU), so the smallest that fits is not found by bisection."""
    st = replace(settings, gpus=1).check(shape)
    problems = gpus_problems(replace(st, gpus=2, batch_size=2), shape, "--fit-gpus (FSDP2 over several GPUs)")
    if problems:
        raise UsageError(problems)
    by_count = {n: plan(shape, replace(st, gpus=n)) if st.batch_size % n == 0 else None for n in counts}
    per_count = [{"gpus": n, "per_gpu_batch_size": p.settings.per_gpu_batch if p else None,
                  "peak_allocated_bytes": p.peak_allocated_bytes if p else None,
                  "peak_reserved_bytes": p.peak_reserved_bytes if p else None,
                  "peak_nvml_bytes": p.peak_nvml_bytes if p else None, "peak_phase": p.peak_phase if p else None}
                 for n, p in by_count.items()]
    table = []
    for name in gpus:
        capacity = GPUS[name] * MiB
        verdicts = [{"gpus": n, "fits": fits(p, capacity) if p else None} for n, p in by_count.items()]
        table.append({"gpu": name, "memory_bytes": capacity, "fits": verdicts,
                      "smallest_gpus": next((v["gpus"] for v in verdicts if v["fits"]), None)})
    return {"global_batch_size": st.batch_size, "counts": per_count, "table": table}


# --- measurement records (data/memory/*.json) --------------------------------------------------------------------

def settings_from_record(record: dict) -> Settings:
    """The Settings of a measurement record (schema: data/memory/README.md)."""
    known = {f for f in Settings.__dataclass_fields__}
    given = {k: v for k, v in record["settings"].items() if k in known}
    given.setdefault("expandable_segments", False)  # recorded since 2026-12-05; every run before had the default
    if record["profile"] == "qtool":  # fields recorded since 2026-12-04; before, the trainer ran as their defaults say
        given.setdefault("loss_chunk_mib", 256)  # 256 MiB of logits per loss chunk
        given.setdefault("flat_params", False)  # one optimizer tensor per LoRA factor
    return Settings(profile=record["profile"], **given)


def carried_allocated_bytes(record: dict, p: Plan) -> int:
    """Allocated bytes that a recorded peak holds from earlier runs in its process and a fresh process would not:
    bench/gpu_worker.py runs every configuration of one model in one process. What is carried shows as the record's
    after-load allocation beyond the plan's. A qtool run keeps all of it through its steps: the cuBLAS workspaces of
    the earlier runs' streams, which torch keeps for the life of the process, less the CUDA-graph capture stream's
    two, which this run reuses instead of creating them (the plan counts those). An hf run carries the previous run's
    autograd graph, freed when its first step rebinds ``loss``, and the default stream's two workspaces, which the
    plan counts: nothing at the peak (data/memory/README.md)."""
    if p.settings.profile != "qtool":
        return 0
    carried = record["measured"]["after_load_allocated_bytes"] - p.after_load_allocated_bytes
    return max(0, carried - 2 * items.CUBLAS_WORKSPACE_BYTES)


def record_process(record: dict, earlier: list[dict] = ()) -> Process:
    """How bench/gpu_worker.py ran ``record``'s configuration: random weights built on the GPU, the trainer of the
    record's date (:data:`qtool.plan.process.RECORDED_TRAINER` for the records of 2026-11-29), after the
    configurations of ``earlier`` (the records before it from the same process, in order)."""
    trainer = record.get("trainer") or (RECORDED_TRAINER if record.get("date", "") <= RECORDED_TRAINER
                                        else EVAL_FIRST_TRAINER)
    if trainer not in TRAINERS:
        raise UsageError(f"record {record.get('id', '?')}: trainer revision {trainer!r} is not one the planner "
                         f"replays ({', '.join(TRAINERS)})", hint="record it with the trainer of this qtool, or add "
                                                                  "its revision to qtool.plan.process")
    return Process(trainer, random_weights=True, earlier=tuple(settings_from_record(r) for r in earlier))


def plan_for_record(record: dict) -> Plan:
    """Plan the model and settings of one measurement record (its ``model`` holds config.json fields) as the bench
    ran it in a fresh process (:func:`record_process`)."""
    model = record["model"]
    shape = shape_from_config({"model_type": "llama", **model}, name=model.get("name", record.get("id", "record")))
    return plan(shape, settings_from_record(record), record_process(record))


def carried_reserved_bytes(record: dict, p: Plan, earlier: list[dict]) -> int:
    """Reserved bytes that a recorded peak holds because of the runs before it in its process, which a fresh
    process would not: the replay of the process (:func:`record_process` with ``earlier``) less that of a fresh
    one. qtool: the earlier runs' cuBLAS workspaces and the segments they keep (on streams no later run allocates
    on); hf: the previous run's graph, which the worker's ``loss`` holds into the first step, and the segments
    the cache kept for it."""
    if not earlier:
        return 0
    return (replay(p.shape, p.settings, record_process(record, earlier)).peak_reserved_bytes
            - replay(p.shape, p.settings, record_process(record)).peak_reserved_bytes)


# --- methods side by side ----------------------------------------------------------------------------------------

def compare_methods(shape: Shape, settings: Settings) -> list[dict]:
    """LoRA as ``settings`` give it, and AdaLoRA, Houlsby adapters and a prefix of the same trainable-parameter budget
    (:func:`qtool.plan.methods.matched_specs`), each planned with the other settings unchanged: per method its
    spec, trainable parameters, memory peaks and inference cost (with the bench record's measurements when present)."""
    st = replace(settings, method="lora").check(shape)
    records = methods.load_records()
    rows = []
    defaults = Settings()
    for name, spec in methods.matched_specs(shape, st.spec).items():
        own = {"method": name, "adapter_size": spec.adapter_size, "prefix_len": spec.prefix_len, "prefix_projection": 0}
        if name == "adalora":
            lora = {"rank": spec.rank, "alpha": spec.alpha, "target_rank": spec.adalora.target_rank, "init": "zero"}
        else:
            lora = {} if name == "lora" else {f: getattr(defaults, f) for f in ("rank", "alpha", "targets", "init")}
        p = plan(shape, replace(st, **own, **lora))
        rows.append({"method": name, "config": spec.describe(), "spec": spec.to_json(), "n_trainable": p.n_trainable,
                     "peak_allocated_bytes": p.peak_allocated_bytes, "peak_nvml_bytes": p.peak_nvml_bytes,
                     "inference": methods.inference_cost(shape, spec, records).to_json()})
    return rows
