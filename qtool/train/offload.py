"""Gradient checkpointing with the layer inputs in host memory (``qtool train --offload-activations``).

Plain checkpointing keeps every decoder layer's input on the GPU from the forward to the backward: n_layers x batch x
seq x hidden x 2 bytes (0.5 GiB for Llama-2-7B at seq 2048). Here each input is copied to a pinned host buffer while
the layer runs, its GPU copy is released, and in the backward it is copied back before the layer is recomputed; the
previous layer's input is copied back while this one runs its backward.

Two pieces: :class:`ActivationOffload` owns the host buffers, the copy stream and its events (one of it per model),
and :func:`offloaded_layer` is the checkpoint, a ``torch.autograd.Function`` that runs the layer without autograd in
the forward and recomputes it from the fetched input in the backward. torch's own non-reentrant checkpoint cannot be
used with saved-tensor hooks for this: it keeps a reference to the layer's inputs for the recomputation, so their GPU
memory would never be freed.

Synchronisation (every copy is stream-ordered and asynchronous, so the whole step can be captured as a CUDA graph —
cudaMemcpyAsync to and from pinned memory is capturable; nothing here waits on the host):

* forward, layer i: the copy stream waits for the compute stream (the input is written), copies it to layer i's
  pinned buffer and records ``done``; layer i computes meanwhile. At layer i + 1 (or the end of the forward) the
  compute stream waits for ``done`` and only then is the GPU tensor dropped, so the allocator cannot hand its memory
  to a kernel while the copy still reads it. (``record_stream`` would do the same eagerly, but during a graph
  capture the allocator defers such blocks to the end of the capture: nothing would be reused, nothing saved.)
* backward, layer i: its input is the one prefetched during layer i + 1's backward (the compute stream waits for its
  copy) or, for the first layer back-propagated, copied now on the compute stream. Then layer i - 1's input is
  allocated on the compute stream and copied on the copy stream after it (it waits for the compute stream first: the
  block may have been freed by kernels still queued there).

The pinned buffers are allocated on first use, one per layer and batch shape, and never freed: a captured graph keeps
their addresses. So the first step must run eagerly (the trainer's warm-up steps do), and a capture that would need a
new buffer is refused. On the CPU the "GPU" and the host are the same memory: the same logic runs with plain copies,
which lets the tests compare gradients with and without offloading, and the allocation traces match the plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _Slot:
    """One layer's host buffer and the copies in flight for it."""

    host: torch.Tensor
    generation: int = 0  # forwards that saved into this buffer: a backward must find its own forward's data
    ready: torch.cuda.Event | None = None  # recorded on the compute stream; the copy stream waits for it
    done: torch.cuda.Event | None = None  # recorded on the copy stream when the buffer (or the GPU tensor) is written


@dataclass
class ActivationOffload:
    """Host memory for the checkpointed layer inputs of one model, and the stream that copies them."""

    slots: dict[tuple, _Slot] = field(default_factory=dict)  # (layer, shape, dtype, device) -> slot, never freed
    _stream: torch.cuda.Stream | None = None
    _order: list[tuple] = field(default_factory=list)  # slots saved by the current forward, in layer order
    _in_flight: tuple | None = None  # (GPU tensor, its slot) of the forward's copy not yet waited for
    _prefetched: tuple | None = None  # (slot key, GPU tensor) copied back ahead of its layer's backward

    def host_bytes(self) -> int:
        """Bytes of host memory the buffers take."""
        return sum(s.host.numel() * s.host.element_size() for s in self.slots.values())

    # --- forward
    def begin_forward(self) -> None:
        self._drop_prefetched()
        self._order = []

    def save(self, index: int, x: torch.Tensor) -> tuple[tuple, int]:
        """Start copying layer ``index``'s input ``x`` to its host buffer; returns the ticket :meth:`fetch` takes."""
        self._release()
        key = (index, tuple(x.shape), x.dtype, x.device)
        slot = self._slot(key, x)
        slot.generation += 1
        self._order.append(key)
        if x.is_cuda:
            compute = torch.cuda.current_stream(x.device)
            stream = self._copy_stream(x.device)
            slot.ready.record(compute)
            stream.wait_event(slot.ready)  # x is written
            with torch.cuda.stream(stream):
                slot.host.copy_(x, non_blocking=True)
            slot.done.record(stream)
            self._in_flight = (x, slot)  # x stays referenced until the compute stream has waited for the copy
        else:
            slot.host.copy_(x)
        return key, slot.generation

    def end_forward(self) -> None:
        self._release()

    def _release(self) -> None:
        """Wait (on the compute stream) for the last forward copy, then drop its GPU tensor."""
        if self._in_flight is not None:
            x, slot = self._in_flight
            if x.is_cuda:
                torch.cuda.current_stream(x.device).wait_event(slot.done)
            self._in_flight = None

    # --- backward
    def fetch(self, ticket: tuple[tuple, int]) -> torch.Tensor:
        """Layer ``ticket``'s input back on its device (a new tensor), and the previous saved layer's input prefetched."""
        key, generation = ticket
        slot = self.slots[key]
        if slot.generation != generation:
            raise RuntimeError(f"--offload-activations: layer {key[0]}'s input was overwritten by a later forward "
                               "before this backward; offloading supports one forward per backward")
        if self._prefetched is not None and self._prefetched[0] == key:
            x = self._prefetched[1]
            if x.is_cuda:
                torch.cuda.current_stream(x.device).wait_event(slot.done)
            self._prefetched = None
        else:
            self._drop_prefetched()
            x = self._to_device(slot, key)
            x.copy_(slot.host, non_blocking=True)  # on the compute stream: ordered before the recomputation
        position = self._order.index(key) if key in self._order else 0
        if position > 0:
            previous = self._order[position - 1]
            self._prefetch(previous)
        return x

    def _prefetch(self, key: tuple) -> None:
        slot = self.slots[key]
        x = self._to_device(slot, key)  # allocated on the compute stream, which will use and free it
        if x.is_cuda:
            compute = torch.cuda.current_stream(x.device)
            stream = self._copy_stream(x.device)
            slot.ready.record(compute)
            stream.wait_event(slot.ready)  # the block may have been freed by kernels still queued on compute
            with torch.cuda.stream(stream):
                x.copy_(slot.host, non_blocking=True)
            slot.done.record(stream)
        else:
            x.copy_(slot.host)
        self._prefetched = (key, x)

    def _drop_prefetched(self) -> None:
        """Forget a prefetched input nobody fetched, after joining its copy (a capture must end with it joined)."""
        if self._prefetched is not None:
            key, x = self._prefetched
            if x.is_cuda:
                torch.cuda.current_stream(x.device).wait_event(self.slots[key].done)
            self._prefetched = None

    # --- buffers
    def _slot(self, key: tuple, x: torch.Tensor) -> _Slot:
        slot = self.slots.get(key)
        if slot is not None:
            return slot
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"--offload-activations: no host buffer for layer {key[0]} at shape {key[1]} yet, and "
                               "pinned memory cannot be allocated during a CUDA graph capture; run one eager step "
                               "with this batch shape first")
        host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=x.is_cuda)
        events = (torch.cuda.Event(), torch.cuda.Event()) if x.is_cuda else (None, None)
        self.slots[key] = slot = _Slot(host, 0, *events)
        return slot

    @staticmethod
    def _to_device(slot: _Slot, key: tuple) -> torch.Tensor:
        _, shape, dtype, device = key
        return torch.empty(shape, dtype=dtype, device=device)

    def _copy_stream(self, device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream


class _OffloadedLayer(torch.autograd.Function):
    """``layer(x, *args)`` whose input waits in host memory for the backward, which recomputes the layer.

    The inputs are ``x``, the tensor arguments and the layer's trainable parameters, so that autograd routes their
    gradients (the parameters' into ``.grad`` as usual, a prefix's keys and values back to the prefix)."""

    @staticmethod
    def forward(ctx, call, x, *rest):
        args, params = rest[:call.n_args], rest[call.n_args:]
        ctx.call, ctx.n_params = call, len(params)
        ctx.rng = _rng_state(x.device) if call.preserve_rng else None
        ctx.save_for_backward(*args)  # cos, sin, masks, a prefix's keys/values: alive for the whole step anyway
        ctx.ticket = call.offload.save(call.index, x)
        return call.layer(x, *args)  # Function.forward runs without autograd: the layer saves nothing

    @staticmethod
    def backward(ctx, grad_y):
        call = ctx.call
        needs = ctx.needs_input_grad[1:]  # x, args..., params...
        x = call.offload.fetch(ctx.ticket).requires_grad_(needs[0])
        args = [a.detach().requires_grad_(need) if torch.is_tensor(a) else a
                for a, need in zip(ctx.saved_tensors, needs[1:1 + call.n_args])]
        params = [p for p in call.layer.parameters() if p.requires_grad]
        # only y's graph is used, not its values: a layer that knows this skips its last product (as torch's own
        # checkpoint stops its recomputation early; qtool.adapters.nf4_linear.output_values_unused)
        skips = hasattr(call.layer, "output_unused")
        with torch.enable_grad(), torch.random.fork_rng(devices=_rng_devices(x.device), enabled=ctx.rng is not None):
            if ctx.rng is not None:
                _set_rng_state(ctx.rng, x.device)
            if skips:
                call.layer.output_unused = True
            try:
                y = call.layer(x, *args)
            finally:
                if skips:
                    call.layer.output_unused = False
        inputs = [x, *args, *params]
        wanted = [i for i, (t, need) in enumerate(zip(inputs, needs)) if need and torch.is_tensor(t)]
        grads = torch.autograd.grad(y, [inputs[i] for i in wanted], grad_y, allow_unused=True) if wanted else ()
        out = [None] * len(inputs)
        for i, g in zip(wanted, grads):
            out[i] = g
        return (None, *out)


@dataclass(frozen=True)
class _Call:
    offload: ActivationOffload
    index: int
    layer: torch.nn.Module
    n_args: int
    preserve_rng: bool


def offloaded_layer(offload: ActivationOffload, index: int, layer: torch.nn.Module, x: torch.Tensor, *args,
                    preserve_rng: bool = False) -> torch.Tensor:
    """``layer(x, *args)`` checkpointed with its input ``x`` kept in host memory by ``offload`` (``index``: the
    layer's position, which names its buffer); ``preserve_rng``: replay the forward's random numbers (dropout) in the
    recomputation, as ``torch.utils.checkpoint``'s ``preserve_rng_state``."""
    params = [p for p in layer.parameters() if p.requires_grad]
    if not (x.requires_grad or params or any(torch.is_tensor(a) and a.requires_grad for a in args)):
        return layer(x, *args)  # nothing to back-propagate into: nothing to keep
    return _OffloadedLayer.apply(_Call(offload, index, layer, len(args), preserve_rng), x, *args, *params)


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
