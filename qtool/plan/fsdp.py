"""Per-GPU memory of data-parallel QLoRA under PyTorch FSDP2 (``--gpus N``): what each rank holds of the parameters,
gradients and optimizer state, and FSDP2's own buffers. Pure Python (no torch).

The layout planned is the one ``qtool train`` uses under FSDP: ``fully_shard`` on every decoder layer and on the root
(embeddings, final norm, head), the packed NF4 weights and their quantisation constants sharded as frozen parameters,
the LoRA factors sharded with their optimizer state, gradients reduce-scattered, no mixed-precision policy (each tensor
is gathered in its own dtype), defaults otherwise. ``--batch-size`` is the global batch: each rank trains batch / N
sequences. Read from torch 2.13's ``torch/distributed/fsdp/_fully_shard/``:

* **Sharding** (``_fsdp_param.py`` FSDPParam._init_sharded_param): every parameter of a group is ``torch.chunk``-ed
  on dim 0 into N pieces; rank 0's piece is the largest, ``ceil(d0 / N)`` rows, and every rank keeps a padded copy of
  that size (``new_zeros(padded_sharded_size)``), one allocation per parameter. The rows below are rank 0's.
* **All-gather** (``_fsdp_collectives.py`` foreach_all_gather): one flat output of ``N x`` the group's padded shard
  bytes (uint8 when the group mixes dtypes, as the NF4 bytes, fp32 factors and 16-bit norms do), the rank's input a
  view into it; the copy-out (foreach_all_gather_copy_out) writes each parameter's own unsharded tensor (padded
  ``ceil(d0 / N) x N`` rows, one allocation each) and the flat output is then freed.
* **How many groups are unsharded at once** (``_fsdp_param_group.py``): ``reshard_after_forward`` defaults to True for
  the layers and False for the root, so the root's embeddings, head and final norm stay unsharded from its forward to
  the end of backward. In backward a layer's pre-backward hook waits for its own all-gather, then prefetches the
  previous layer's (``_backward_prefetch``): while a layer runs its backward, its unsharded parameters and the next
  one's flat all-gather output exist together. The forward holds the same two (the next group frees the previous
  all-gather output after its copy-out: ``all_gather_state``) with fewer activations, except at its start, where the
  root's flat all-gather output waits for layer 0's copy-out (:func:`forward_phases`).
* **Reduce-scatter** (foreach_reduce): the group's unsharded gradients are copied into one padded fp32 input (then
  freed), and the rank's shard is written into one flat output per group that becomes the sharded ``.grad`` views
  (kept until ``zero_grad``). The input is kept until the next group's reduce-scatter
  (``reduce_scatter_max_input_buffers`` = 1): one layer's unsharded LoRA gradients beside the next layer's backward.
  Frozen parameters (the NF4 weights, norms, embeddings) have no gradient and take no part.
* **NCCL** allocates its buffers with the CUDA driver, outside PyTorch's allocator: NVML sees them, no torch counter
  does. Per connection and channel NCCL keeps one buffer per protocol (``src/init.cc`` computeBuffSizes: LL 512 KiB,
  LL128 4,800 KiB, Simple 4 MiB), and the number of channels depends on the GPUs and links. The row is a measured
  figure from someone else's machine (NCCL_COMMUNICATOR_BYTES), not ours.

What it leaves out: the optimizer sees each rank's local shard (bitsandbytes 0.50.2's optimizers have no DTensor
support: its paged buffers are sized by ``p.shape``, the global shape, so a paged optimizer must step ``p.to_local()``);
the reserved slack keeps the one-GPU qtool rule, though FSDP's three side streams keep their own cached blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qtool.plan import resident as items
from qtool.plan.resident import DTYPE_BYTES, alloc, frozen_bytes_per_param, nf4_tensor_parts, norm_parts
from qtool.plan.rows import Row
from qtool.plan.settings import layer_linears
from qtool.plan.transient import widths
from qtool.units import MiB

if TYPE_CHECKING:
    from qtool.arch import Shape
    from qtool.plan.settings import Settings

GPU_COUNTS = (1, 2, 4, 8)  # what --fit-gpus tries: the GPUs of one host
# The caching allocator's slack (reserved - allocated) of an eager FSDP step is not replayed (qtool/plan/process.py
# models the one-GPU trainers): estimated as the working bytes of the peak phase, the rule the one-GPU plan used
# until 2026-12-04 (within 12% of the qtool records then). Unvalidated: no multi-GPU record exists.
SLACK_FRACTION = 1.0
SLACK_ROW = "allocator slack (estimate under FSDP: the peak phase's working bytes; unvalidated)"
# NCCL's device memory per process for one communicator (FSDP2's all-gathers and reduce-scatters share the default
# process group, so one). Source: NVIDIA/nccl issue #964 (2023-08): PyTorch process groups on 4x A100 with NVLink,
# each after a 4 MB all-reduce, grew nvidia-smi's used memory by 544 MB for a group of 2 GPUs and 688 MB for 3 or
# 4 (the MB of nvidia-smi, which are MiB). The maintainers add (issue #986) that the memory is linear in the number of
# channels and that ring collectives use two connections per rank whatever the scale. Not measured on our stack;
# Hopper may run more channels (24 on the 8-GPU NVLink SHARP machine of issue #1259), and issue #1685 reports
# 1.06 GB per GPU outside PyTorch's memory on 8x H100 before an all-to-all: more than this may hold there.
NCCL_COMMUNICATOR_BYTES = {2: 544 * MiB, 4: 688 * MiB}
NCCL_SOURCE = "NVIDIA/nccl#964: 544 MiB for 2 GPUs, 688 MiB for 3-4 (A100, NVLink); not measured on our stack"


KINDS = ("nf4", "norm", "embedding", "lora")  # NF4 bytes and constants; norms and biases; embeddings and head; LoRA


@dataclass(frozen=True)
class Param:
    """One parameter FSDP2 shards: ``rows`` on dim 0 (the sharded dim), ``numel`` elements of ``element_bytes``;
    ``kind`` one of KINDS (only ``lora`` is trained)."""

    rows: int
    numel: int
    element_bytes: int
    kind: str

    @property
    def trainable(self) -> bool:
        return self.kind == "lora"

    def shard_numel(self, n: int) -> int:
        """Elements of rank 0's shard, the largest: ceil(rows / n) rows, the padded size every rank allocates."""
        return -(-self.rows // n) * (self.numel // self.rows)

    def shard_bytes(self, n: int) -> int:
        return self.shard_numel(n) * self.element_bytes

    def unsharded_bytes(self, n: int) -> int:
        """The all-gathered tensor: the padded shard times n (the padding rows are gathered too)."""
        return n * self.shard_bytes(n)


def layer_params(shape: Shape, st: Settings) -> list[Param]:
    """The parameters of one decoder layer's FSDP group, as qtool's NF4Weight holds them (qtool/nf4/codec.py
    QuantizedWeight: packed uint8 ``[(n + 1) // 2, 1]``, absmax ``[n_blocks]``, nested absmax ``[n_blocks / 256]``;
    the NF4 code table is one shared per device, not a parameter), Linear biases and norm weights in the compute dtype,
    LoRA A ``[r, in]`` and B ``[out, r]`` in the adapter dtype. The symmetric init's frozen initial factors are
    buffers (qtool/adapters/lora.py LoRALinear), which FSDP neither shards nor gathers: :func:`persistent_rows`."""
    cb, ab = DTYPE_BYTES[st.compute_dtype], DTYPE_BYTES[st.adapter_dtype]
    ranks = st.module_ranks(shape)
    params = []
    for lin in layer_linears(shape):
        parts = nf4_tensor_parts(lin.n_in * lin.n_out, st.block_size, st.double_quant, code_tables=False)
        # packed, absmax (8-bit codes or fp32), nested absmax; gathered as bytes, so numel counts bytes
        element_widths = (1, 1, 4) if st.double_quant else (1, 4)
        params += [Param(b // w, b, 1, "nf4") for b, w in zip(parts, element_widths)]
        params += [Param(lin.n_out, lin.n_out, cb, "norm")] if lin.bias else []
        if lin.name in ranks:
            r = ranks[lin.name]
            params += [Param(r, r * lin.n_in, ab, "lora"), Param(lin.n_out, lin.n_out * r, ab, "lora")]
    fb = frozen_bytes_per_param(st)
    per_layer, _ = norm_parts(shape, fb)
    return params + [Param(b // fb, b // fb, fb, "norm") for b in per_layer]


def root_params(shape: Shape, st: Settings) -> list[Param]:
    """The root group: input embeddings ``[V, h]``, the untied head ``[V, h]`` and the final norm (frozen)."""
    fb = frozen_bytes_per_param(st)
    table = Param(shape.vocab, shape.vocab * shape.hidden, fb, "embedding")
    _, final = norm_parts(shape, fb)
    return [table] * (1 if shape.tied_embeddings else 2) + [Param(b // fb, b // fb, fb, "norm") for b in final]


def sharded_bytes(params: list[Param], n: int, kind: str | None = None) -> int:
    """What the allocator books for the padded shards (of ``kind`` only, if given), one tensor per parameter."""
    return sum(alloc(p.shard_bytes(n)) for p in params if kind in (None, p.kind))


def unsharded_bytes(params: list[Param], n: int) -> int:
    """One group's parameters all-gathered: one tensor per parameter, padding included."""
    return sum(alloc(p.unsharded_bytes(n)) for p in params)


def all_gather_output_bytes(params: list[Param], n: int) -> int:
    """One group's flat all-gather output: n x the padded shard bytes of all its parameters, one tensor."""
    return alloc(n * sum(p.shard_bytes(n) for p in params))


def reduce_scatter_input_bytes(params: list[Param], n: int) -> int:
    """One group's reduce-scatter input: every trainable parameter's gradient, padded, in one tensor."""
    return alloc(sum(p.unsharded_bytes(n) for p in params if p.trainable))


def sharded_grad_bytes(params: list[Param], n: int) -> int:
    """One group's sharded gradients: the reduce-scatter output, one flat tensor that the ``.grad`` views share."""
    return alloc(sum(p.shard_bytes(n) for p in params if p.trainable))


def local_trainable_numels(shape: Shape, st: Settings) -> list[int]:
    """Element counts of rank 0's shards of every trainable tensor, which the optimizer steps."""
    return [p.shard_numel(st.gpus) for p in layer_params(shape, st) if p.trainable] * shape.n_layers


def nccl_bytes(n: int) -> int:
    """NCCL's device memory per rank (NCCL_COMMUNICATOR_BYTES): none on one GPU."""
    if n == 1:
        return 0
    return NCCL_COMMUNICATOR_BYTES[2 if n == 2 else 4]


def sharded_grads_bytes(shape: Shape, st: Settings) -> int:
    """Every layer's sharded LoRA gradients (one reduce-scatter output per layer), as at the end of backward."""
    return shape.n_layers * sharded_grad_bytes(layer_params(shape, st), st.gpus)


def after_load_bytes(shape: Shape, st: Settings) -> int:
    """Allocated on each rank after loading and sharding: the shards of every parameter and the model's buffers."""
    n = st.gpus
    return shape.n_layers * sharded_bytes(layer_params(shape, st), n) + sharded_bytes(root_params(shape, st), n) \
        + items.buffer_bytes(shape, st)


def persistent_rows(shape: Shape, st: Settings, adapters: str) -> list[Row]:
    """What each rank keeps through the step: its shards, the optimizer state of its LoRA shards, its cuBLAS
    workspaces, NCCL's buffers and, when accumulating, the sharded gradients. ``adapters``: the LoRA row's name."""
    n, n_layers = st.gpus, shape.n_layers
    layer, root = layer_params(shape, st), root_params(shape, st)
    frozen, shard = st.compute_dtype, f"1/{n} shard"
    table = alloc(root[0].shard_bytes(n))
    opt_device, opt_paged = items.optimizer_state_bytes(local_trainable_numels(shape, st), st.optimizer,
                                                        DTYPE_BYTES[st.adapter_dtype])
    n_workspaces = items.cublas_workspaces(st)
    return [
        Row(f"NF4 weights and quantisation constants, {shard} each (dim 0 padded to a multiple of {n})",
            n_layers * sharded_bytes(layer, n, "nf4")),
        Row(f"embeddings ({frozen}), {shard}", table),
        *([] if shape.tied_embeddings else [Row(f"lm_head ({frozen}), {shard}", table)]),
        Row(f"norms and biases ({frozen}), {shard}; rotary tables whole",
            n_layers * sharded_bytes(layer, n, "norm") + sharded_bytes(root, n, "norm")
            + items.buffer_bytes(shape, st)),
        Row(f"{adapters}, {shard}", n_layers * sharded_bytes(layer, n, "lora")),
        *([Row("LoRA initial factors, frozen (symmetric init; buffers, which FSDP does not shard)",
               items.tensors_alloc(items.lora_tensors(shape, st), DTYPE_BYTES[st.adapter_dtype]))]
          if st.init == "symmetric" else []),
        Row(f"optimizer state ({st.optimizer}) on device, of the {shard}s", opt_device),
        *([Row("optimizer state, paged (managed memory)", opt_paged, "paged", "nvml")] if opt_paged else []),
        Row(f"cuBLAS workspaces ({n_workspaces} x {items.CUBLAS_WORKSPACE_BYTES // MiB} MiB)",
            n_workspaces * items.CUBLAS_WORKSPACE_BYTES),
        *([Row(f"LoRA gradients, {shard} (reduce-scatter outputs), accumulated over {st.grad_accum} micro-batches",
               sharded_grads_bytes(shape, st))] if st.grad_accum > 1 else []),
        Row("NCCL communicator buffers (driver allocations: no torch counter sees them)", nccl_bytes(n),
            counter="nvml"),
    ]


def phase_rows(shape: Shape, st: Settings) -> dict[str, tuple[list[Row], list[Row]]]:
    """FSDP's rows of each phase of the step, as (kept through the phase, working at its moment); empty for phases
    that have none. In backward the root is whole; the loss backward has the last layer's all-gather prefetched by
    the root's pre-backward hook; a layer's backward its own parameters and the next layer's prefetched all-gather
    output (none before layer 0), and layer 0's the reduce-scatter input of layer 1; the optimizer step runs on the
    shards alone (the root reshards after backward)."""
    n, n_layers = st.gpus, shape.n_layers
    layer, root = layer_params(shape, st), root_params(shape, st)
    whole = Row("FSDP: the root's embeddings, head and final norm, all-gathered (kept from forward to the end of "
                "backward)", unsharded_bytes(root, n))
    gathered = Row("FSDP: this layer's parameters, all-gathered", unsharded_bytes(layer, n))
    prefetch = Row("FSDP: all-gather output of the next layer to back-propagate, prefetched (one flat buffer)",
                   all_gather_output_bytes(layer, n))
    reduce_input = Row("FSDP: reduce-scatter input of layer 1 (its LoRA gradients, unsharded; kept until the next "
                       "one)", reduce_scatter_input_bytes(layer, n))
    working = {"loss backward": [prefetch], "final norm backward": [prefetch],
               "backward of the last decoder layer": [gathered] + ([prefetch] if n_layers > 1 else []),
               "backward of the first decoder layer": [gathered, reduce_input]}
    phases = ("loss backward", "final norm backward", "backward of the last decoder layer",
              "backward of the first decoder layer", "optimizer step")
    return {name: ([] if name == "optimizer step" else [whole], working.get(name, [])) for name in phases}


def forward_phases(shape: Shape, st: Settings) -> dict[str, tuple[list[Row], list[Row]]]:
    """The forward's one FSDP moment that can be the peak, at its start, when few activations exist yet: the root
    all-gathered, its flat all-gather output (freed only after layer 0's copy-out: ``all_gather_state``) and layer
    0's flat all-gather output; beside them the embedding output. With a large vocabulary and a short sequence this
    outweighs the backward."""
    n = st.gpus
    layer, root = layer_params(shape, st), root_params(shape, st)
    tokens = st.per_gpu_batch * st.seq_len
    return {"forward: the root's and layer 0's all-gathers": (
        [Row("FSDP: the root's embeddings, head and final norm, all-gathered", unsharded_bytes(root, n)),
         Row("embedding output (layer 0's input)", alloc(tokens * shape.hidden * widths(st)[0]))],
        [Row("FSDP: the root's all-gather output (one flat buffer, freed after layer 0's copy-out)",
             all_gather_output_bytes(root, n)),
         Row("FSDP: layer 0's all-gather output (one flat buffer)", all_gather_output_bytes(layer, n))])}


def counts_that_split(batch_size: int, counts: tuple[int, ...] = GPU_COUNTS) -> list[int]:
    """The GPU counts among ``counts`` that split a global batch evenly (each rank needs batch / N sequences)."""
    return [n for n in counts if batch_size % n == 0]


def notes(shape: Shape, st: Settings) -> list[str]:
    """What the per-GPU plan assumes, and that it is not validated yet."""
    n = st.gpus
    return [
        f"--gpus {n}: per-GPU plan of FSDP2 data parallelism (fully_shard per decoder layer and on the root; the NF4 "
        f"weights, constants, norms, embeddings, head and LoRA factors sharded 1/{n} on dim 0, padded to a multiple "
        f"of {n}); --batch-size {st.batch_size} is the global batch, {st.per_gpu_batch} sequence(s) per GPU; the rows "
        "are rank 0's, whose shards are the largest",
        "FSDP2 keeps the root's embeddings, head and final norm unsharded from the forward to the end of backward "
        "(reshard_after_forward is False for the root), and its flat all-gather output too until layer 0's "
        "all-gather is copied out; while a layer runs its backward, its unsharded parameters sit beside the "
        "previous layer's prefetched all-gather output",
        f"--gpus {n}: CUDA graphs and the flat parameter buffer are off under FSDP (qtool train runs eager); the "
        "optimizer is planned on each rank's local shards (bitsandbytes' optimizers do not know DTensor)",
        f"NCCL buffers: {NCCL_SOURCE}",
        "the multi-GPU rows are not validated against measurements: no multi-GPU machine has been available. Runs that "
        "would validate them: qtool train under torchrun on 2, 4 and 8 H200s, llama-2-7b at seq 2048 (batch = N) and "
        "a 70B shape at seq 4096-8192, each rank's peak allocated, reserved and NVML-used recorded beside the plan, "
        "and NCCL's share as NVML-used before and after init_process_group and the first all-gather",
    ]
