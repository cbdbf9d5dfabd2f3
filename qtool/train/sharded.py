"""The decoder sharded across the ranks of a data-parallel run with PyTorch FSDP2
(``torch.distributed.fsdp.fully_shard``): loaded shard by shard from a converted folder, and its adapter gathered back
for writing.

What is sharded, and how FSDP2 takes it:

* Every tensor of the base — the NF4 packed bytes (uint8 ``[(n + 1) // 2, 1]``), block constants (uint8, or fp32
  without double quantisation, ``[n_blocks]``), nested constants (fp32), biases, norms, embedding and head — becomes a
  frozen ``nn.Parameter`` (``requires_grad=False``) where the single-process model has a buffer: FSDP2 shards
  parameters and replicates buffers. The adapters' parameters and the symmetric init's frozen offsets are sharded too
  (so is their optimizer state: AdamW runs on the shards).
* One FSDP group per decoder layer (its NF4 weights, norms and adapters) and the root group (embedding, final norm,
  head, embedding/head LoRA, prefix). A group may mix dtypes: FSDP2 all-gathers a group's shards as bytes when their
  dtypes differ (``_fsdp_collectives.py``, ``_get_all_gather_input_metadatas``: ``all_gather_dtype = torch.uint8``)
  and requires one dtype only of the parameters that get gradients (``_fsdp_param_group.py``, ``_init_mp_dtypes``):
  here the adapters' fp32. So neither separate groups nor a byte view of our own are needed.
* The model reads every tensor by attribute when it runs (``NF4Weight.quantized``, the norms, ``Decoder.embed``; the
  NF4 product keeps a reference to its module, not to the tensors, for its backward), which is what FSDP2 swaps: the
  all-gathered tensor from a group's pre-forward hook (and again from its pre-backward hook, after the layer freed it
  post-forward), the shard otherwise. ``Decoder.loss`` is registered as a forward method, so the root group gathers
  for it as for ``forward``.
* Each parameter is split on dim 0 as ``torch.chunk`` splits it: ``c = ceil(rows / N)`` rows per rank, rank r holding
  rows ``r·c .. min((r + 1)·c, rows) - 1`` (the last ranks shorter or empty; FSDP pads its own buffers).

Loading keeps no full base tensor in any process: the model is built on the meta device from the safetensors headers
(only the NF4 quant-state blobs, < 512 bytes each, are read); the adapters are made in full on the CPU as the
single-process run makes them (same generator, same order: small, and dropped once sharded); the groups are formed;
then each rank materialises its shards and fills them — base rows straight from the memory-mapped files (only that
byte range is touched, then released), adapter rows from the full initial values.

What runs differently from one process: CUDA graphs are off (FSDP2 all-gathers and frees each group's storage around
its forward and backward, and reduce-scatters between layers: none of it is in one replayable graph), so is the flat
parameter buffer that exists for them (:mod:`qtool.train.flat`); activation offloading and bitsandbytes' optimizers
are refused (untested with FSDP's hooks and DTensor shards; torch AdamW updates the shards). The fused kernels (NF4
dequantisation, RMSNorm, RoPE, SwiGLU) run as usual on the gathered tensors. Tested on the CPU with gloo (2-3
processes: tests/test_train_distributed.py); the CUDA path (NCCL, one GPU per process) is the same code, untested.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from qtool.adapters.attach import attach_adapters
from qtool.adapters.spec import AdapterSpec
from qtool.train.distributed import Ranks
from qtool.train.load import ConvertedFolder, build_decoder


def load_sharded_decoder(folder, spec: AdapterSpec | None, ranks: Ranks, *, device: torch.device,
                         compute_dtype: torch.dtype, seed: int = 0, adapter_dtype: torch.dtype = torch.float32,
                         initial: dict | None = None):
    """The decoder of a converted folder with the adapters of ``spec``, sharded over ``ranks`` (a process group must
    exist); this rank holds only its shards. Returns ``(model, base_names, report)``: ``base_names`` the parameter
    names read from the checkpoint (the rest is the adapter, :func:`gather_adapter`), ``report`` this rank's bytes
    (:func:`shard_report`) and its resident-memory growth while loading."""
    import torch._dynamo  # noqa: F401 (FSDP2's hooks import it on first use: ~25 MB of modules, not data)
    from torch.distributed.device_mesh import init_device_mesh

    rss_before = _resident_bytes()  # the modules loading needs are imported: the growth is the model's
    tensors = ConvertedFolder(folder)
    # id(meta tensor) -> (the tensor, kept alive so that its id stays its own; the checkpoint key it stands for)
    origin: dict[int, tuple[torch.Tensor, str]] = {}

    def quantized(key, shape_):
        qw = tensors.quantized(key, meta=True)
        for t, name in ((qw.packed, key), (qw.absmax, f"{key}.absmax"), (qw.nested_absmax, f"{key}.nested_absmax")):
            if t is not None:
                origin[id(t)] = (t, name)
        return qw

    def dense(key, shape_):
        t = tensors.dense(key, meta_dtype=compute_dtype)  # in the compute dtype already: build_decoder keeps it
        origin[id(t)] = (t, key)
        return t

    model = build_decoder(tensors.shape, quantized, dense, device="meta", compute_dtype=compute_dtype)
    tensors.check_all_used()
    if spec is not None:
        attach_adapters(model, spec, seed=seed, adapter_dtype=adapter_dtype, initial=initial, device="cpu")
    base, initial_values = _frozen_parameters(model, origin)
    mesh = init_device_mesh(device.type, (ranks.world_size,))
    _shard(model, mesh)
    # every shard becomes real memory on this rank's device (uninitialised); the full initial adapter is kept
    # in `initial_values` until its rows are copied
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local, start, stop = _local_elements(p, ranks)
            if name in base:
                src = tensors.elements(base[name], start, stop)
                local.view(-1).copy_(src)  # converts to the compute dtype as the single-process load does
                tensors.release(base[name])  # this rank's pages of the file, dropped once copied
            else:
                local.view(-1).copy_(initial_values.pop(name).reshape(-1)[start:stop])
        for name, constant in model.shape_constants(device).items():
            setattr(model, name, constant)
    tensors.close()  # everything was copied out of the mapped files
    assert not initial_values, sorted(initial_values)
    report = shard_report(model, ranks)
    report["resident_growth_bytes"] = _resident_bytes() - rss_before  # RSS: the process's view, allocator included
    return model, set(base), report


def _frozen_parameters(model: nn.Module, origin: dict[int, tuple[torch.Tensor, str]]):
    """Turn every buffer except the shape constants into a frozen parameter (FSDP2 shards parameters only), the same
    ``nn.Parameter`` under every name that shares one tensor (a tied head is the embedding). Returns ``(base,
    initial)``: parameter name -> checkpoint key for the base, and name -> full CPU tensor for what is already real
    (the adapters)."""
    constants = set(model.shape_constants("meta"))
    made: dict[int, nn.Parameter] = {}
    base = {}
    for mod_name, module in model.named_modules():
        for name, buf in list(module._buffers.items()):  # named_buffers() would skip a second name of one tensor
            if buf is None or (module is model and name in constants):
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            if id(buf) not in made:
                made[id(buf)] = nn.Parameter(buf, requires_grad=False)
                if buf.is_meta:
                    assert id(buf) in origin, f"{full} is on the meta device but not read from the checkpoint"
                    base[full] = origin[id(buf)][1]
            del module._buffers[name]
            module.register_parameter(name, made[id(buf)])
    left = [n for n, _ in model.named_buffers(remove_duplicate=False) if n not in constants]
    assert not left, f"buffers left unsharded: {left}"
    initial = {name: p.detach() for name, p in model.named_parameters() if not p.is_meta}
    return base, initial


def _shard(model: nn.Module, mesh) -> None:
    """One FSDP group per decoder layer, then the root group (what remains: embedding, final norm, head and their
    adapters). Every group is freed after its forward and gathered again for its backward — the root too, which
    FSDP2 would otherwise keep gathered after a forward: after an evaluation (a forward with no backward) the root's
    attributes would then stay the gathered full tensors, and an optimizer made from ``model.parameters()`` at that
    point would hold those instead of the shards that receive the gradients (the head's LoRA never trained)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    register_fsdp_forward_method(model, "loss")  # the recipe calls model.loss, not forward


def _local_elements(p: torch.Tensor, ranks: Ranks) -> tuple[torch.Tensor, int, int]:
    """``(local tensor, start, stop)``: this rank's shard of parameter ``p`` (a DTensor sharded on dim 0) and the
    range of elements of the flattened full tensor it holds."""
    local = p.to_local()
    rows = p.shape[0]
    per_rank = -(-rows // ranks.world_size)
    first = min(rows, ranks.rank * per_rank)
    n_rows = min(rows, first + per_rank) - first
    assert local.shape[0] == n_rows and local.is_contiguous(), (tuple(p.shape), tuple(local.shape), n_rows)
    row_numel = math.prod(p.shape[1:])
    return local, first * row_numel, (first + n_rows) * row_numel


def shard_report(model: nn.Module, ranks: Ranks) -> dict:
    """This rank's share of the model's tensors: bytes of its parameter shards (``param_bytes``) against the full
    parameters (``model_param_bytes``), and of the replicated buffers (the shape constants)."""
    local = total = 0
    for p in model.parameters():
        shard = p.to_local() if hasattr(p, "to_local") else p
        local += shard.numel() * shard.element_size()
        total += p.numel() * p.element_size()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"rank": ranks.rank, "world_size": ranks.world_size, "param_bytes": local, "model_param_bytes": total,
            "buffer_bytes": buffers}


def gather_adapter(model: nn.Module, base_names: set[str], ranks: Ranks) -> None:
    """Put the full tensor of every parameter that is not the base (adapter factors; the symmetric init's offsets,
    back as buffers) on the CPU of rank 0, so that the single-process writers save them unchanged. Every rank takes
    part (one all-gather per tensor, in the same order everywhere); the other ranks keep their shards. The model is
    for writing only afterwards: FSDP no longer manages the replaced tensors."""
    for mod_name, module in list(model.named_modules()):
        for name, p in list(module.named_parameters(recurse=False)):
            full_name = f"{mod_name}.{name}" if mod_name else name
            if full_name in base_names:
                continue
            full = p.full_tensor().detach().cpu()
            if not ranks.is_main:
                continue
            del module._parameters[name]
            if p.requires_grad:
                module.register_parameter(name, nn.Parameter(full))
            else:  # a frozen adapter tensor was a buffer in the single-process model
                module.register_buffer(name, full, persistent=False)


def _resident_bytes() -> int:
    """This process's resident set size (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
