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

from qtool.arch import Shape
from qtool.plan import fsdp, methods, notes, offload, unsloth
from qtool.plan import resident as items
from qtool.plan.process import Process, replay
from qtool.plan import transient as acts
from qtool.plan import vocab
from qtool.plan.rows import Row
from qtool.plan.settings import (ATTENTIONS, BLOCKSIZES, DEVICES, DTYPES, LOSSES, OPTIMIZERS, PROFILES,  # noqa: F401
                                 RECIPES, TARGET_PRESETS, Settings)
from qtool.units import MiB


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
