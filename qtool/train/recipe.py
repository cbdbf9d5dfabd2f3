"""``qtool train``: adapters (LoRA, Houlsby adapters, a prefix) on a converted NF4 checkpoint, measured against the
plan. A recipe: setup, loop, result."""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from qtool.adapters.spec import CONVERTER_INITS, UNTARGETED_METHODS
from qtool.errors import QtoolError, UsageError
from qtool.train.allocator import set_up as allocator_set_up
from qtool.train.distributed import SINGLE, Ranks
from qtool.train.flat import flatten_parameters
from qtool.train.measure import MemoryMonitor, compare_with_plan, plan_settings
from qtool.train.offload import ActivationOffload
from qtool.train.settings import TrainSettings, check_inputs


@dataclass
class TrainResult:
    adapter: Path | None
    device: str
    optimizer: str
    trainable_params: int
    losses: list[float]  # per optimizer step: the mean loss of that step's micro-batches (noisy: one batch)
    step_seconds: list[float]
    eval_loss: float  # mean loss over the held-out blocks after training
    tokens_per_step: int
    eval_loss_before: float | None = None  # the same held-out blocks before the first step
    compute_dtype: str = ""  # what the products ran in, and why
    paged_state_bytes: int = 0  # optimizer state in CUDA managed memory (bitsandbytes' paged optimizers)
    cuda_graph: str = "off"  # "on", "off", or why the capture failed (the run then continued eagerly)
    plan_comparison: list[dict] = field(default_factory=list)  # measured vs `qtool plan`, see qtool.train.measure
    memory: list[dict] = field(default_factory=list)  # MemorySample rows, per phase
    peaks: dict = field(default_factory=dict)  # measured after the warm-up steps
    settings: dict = field(default_factory=dict)
    adalora: dict = field(default_factory=dict)  # AdaLoRA: RankAllocator.report() (+ the budget summary after run())
    eval_curve: list[list] = field(default_factory=list)  # [step, held-out loss] from step 0 to the last (--eval-every)
    distributed: dict = field(default_factory=dict)  # several processes: world size, backend, each rank's shard bytes

    @property
    def tokens_per_second(self) -> float:
        timed = self.step_seconds[1:] or self.step_seconds  # the first step pays one-off costs
        return self.tokens_per_step / (sum(timed) / len(timed))

    def to_json(self) -> dict:
        d = asdict(self)
        d["adapter"] = str(self.adapter) if self.adapter else None
        d["tokens_per_second"] = self.tokens_per_second
        return d


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def make_optimizer(params, name: str, device: torch.device, lr: float, weight_decay: float, sharded: bool = False):
    """bitsandbytes' (paged) AdamW on CUDA; torch AdamW on the CPU (bitsandbytes' optimizers need CUDA) and on FSDP's
    shards (``sharded``: DTensor parameters, which torch's optimizers update shard by shard)."""
    if name == "auto":
        name = "paged_adamw_32bit" if device.type == "cuda" and not sharded else "adamw_torch"
    if name == "sgd":
        return name, torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw_torch" or (device.type != "cuda" and name.startswith(("adamw", "paged"))):
        if device.type != "cuda" and name != "adamw_torch":
            raise UsageError(f"--optimizer {name} needs a CUDA device (bitsandbytes' optimizers)",
                             hint="use --optimizer adamw_torch on the CPU")
        return name, torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "adamw_32bit": bnb.optim.AdamW32bit, "adamw_8bit": bnb.optim.AdamW8bit}[name]
    return name, cls(params, lr=lr, weight_decay=weight_decay)


# What qtool.plan.process replays as this trainer (bench records carry it): "2026-12-04b" captures the CUDA graph on
# the warm-up's stream and gives the held-out pass's cuBLAS workspace back before training.
REVISION = "2026-12-04b"


class _GraphedMicroStep:
    """One micro-batch's forward and backward captured once as a CUDA graph, then replayed per micro-batch.

    A QLoRA step launches thousands of small kernels (three passes over every layer); replaying them as one graph
    removes the Python and launch cost per kernel, which otherwise exceeds the GPU time. The gradients of the LoRA
    factors must already exist (they are accumulated in place by the replay), the batch is copied into a static
    input, and the allocations made during capture stay in the graph's private pool (their peak is what
    ``max_memory_allocated`` records during capture).
    """

    def __init__(self, model, batch_shape, device, grad_accum: int,
                 regulariser: Callable[[], torch.Tensor] | None = None, stream: torch.cuda.Stream | None = None):
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        self.ids = torch.zeros(batch_shape, dtype=torch.int64, device=device)
        self.graph = torch.cuda.CUDAGraph()
        # captured on the warm-up's stream: cuBLAS keeps a 32 MiB workspace per (thread, stream), and the warm-up's
        # two (forward, autograd) serve the capture too instead of two more on a stream of its own
        with torch.cuda.graph(self.graph, stream=stream):  # records, does not run
            self.loss = model.loss(self.ids) / grad_accum
            # AdaLoRA's regulariser reads only the parameters, which the allocator changes in place: capturable
            (self.loss + regulariser() / grad_accum if regulariser else self.loss).backward()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(batch)
        self.graph.replay()
        return self.loss.detach().clone()


def evaluate(model, rows: torch.Tensor, batch_size: int, device: torch.device,
             progress: Callable[[int, int], None] | None = None, ranks: Ranks = SINGLE) -> float:
    """Mean loss over ``rows`` (held-out blocks), in eval mode and without gradients; each batch's rows shared among
    the ``ranks`` (:meth:`Ranks.batch_mean`)."""
    training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            losses.append(float(ranks.batch_mean(model.loss, rows[i:i + batch_size].to(device))))
            if progress:
                progress(min(i + batch_size, len(rows)), len(rows))
    model.train(training)
    return sum(losses) / len(losses)


def train(model, blocks, st: TrainSettings, *, device: torch.device,
          progress: Callable[[int, float, float], None] | None = None,
          eval_progress: Callable[[str, int, int], None] | None = None, ranks: Ranks = SINGLE) -> TrainResult:
    """Train the adapter factors of ``model`` (a :class:`qtool.train.model.Decoder` already on ``device``) on
    ``blocks``; the held-out loss is measured before the first step and after the last (``eval_progress(phase,
    done, total)`` reports it, phase "before"/"after"). With several ``ranks`` the model is sharded
    (:mod:`qtool.train.sharded`): each rank runs its slice of every global batch, FSDP averages the gradients, and
    the losses reported are the means over the ranks (:mod:`qtool.train.distributed`)."""
    # --- setup
    def held_out(phase: str) -> float:
        return evaluate(model, blocks.eval, st.batch_size, device,
                        (lambda d, n: eval_progress(phase, d, n)) if eval_progress else None, ranks)

    eval_before = held_out("before")
    torch.manual_seed(st.seed + ranks.rank)  # dropout: each rank its own masks (init and data order use st.seed)
    model.train()
    model.grad_checkpointing = st.grad_checkpointing
    # the checkpointed inputs in pinned host memory: its buffers appear in the first (eager) step, before any capture
    model.offload = ActivationOffload() if st.offload_activations else None
    params = [p for p in model.parameters() if p.requires_grad]
    # not under FSDP: its all-gathers and reduce-scatters run between the layers, outside what one graph replays
    use_graph = st.cuda_graphs and device.type == "cuda" and st.dropout == 0 and ranks.world_size == 1
    # the CUDA-graph path keeps gradients allocated anyway: parameters and gradients in one buffer each, so the
    # optimizer runs one kernel instead of one per tensor (qtool/train/flat.py); zeroed in place from now on
    flat = use_graph
    opt_params = flatten_parameters(params) if flat else params
    if flat:  # give the factors' old blocks back: cached, they would stay reserved beside the flat buffer
        torch.cuda.empty_cache()
    opt_name, opt = make_optimizer(opt_params, st.optimizer, device, st.lr, st.weight_decay, ranks.world_size > 1)
    monitor = MemoryMonitor(device)
    monitor.sample("after_load")
    allocator = regulariser = None
    if st.method == "adalora":  # its EMAs appear now, like optimizer state: after the after-load sample
        from qtool.adapters.adalora import RankAllocator, adalora_modules

        allocator = RankAllocator(adalora_modules(model), st.spec.adalora)
        regulariser = allocator.regulariser if allocator.schedule.orth_reg > 0 else None
    gen = torch.Generator().manual_seed(st.seed)
    order = torch.randperm(len(blocks.train), generator=gen)
    cursor = 0
    losses, step_seconds, measured_from = [], [], None
    curve = [[0, eval_before]]

    def next_batch():
        nonlocal cursor, order
        rows = []
        for _ in range(st.batch_size):
            if cursor == len(order):
                order, cursor = torch.randperm(len(blocks.train), generator=gen), 0
            rows.append(order[cursor])
            cursor += 1
        # every rank draws the same global batch and keeps its own slice of the rows
        return ranks.rows(blocks.train[torch.stack(rows)]).to(device, non_blocking=True)

    if use_graph:
        # the held-out pass ran on the default stream, which runs no product from now on: give its cuBLAS workspace
        # back before the warm-up's own appear (nothing is captured yet, so no graph holds it)
        torch.cuda.synchronize(device)
        getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
    # --- loop
    graph, graph_note = None, "off"
    if st.cuda_graphs and device.type == "cuda" and ranks.world_size > 1:
        graph_note = "off: not with FSDP (several processes)"
    # the warm-up before the capture runs forward and backward on a side stream, as CUDA-graph capture wants
    side, main = (torch.cuda.Stream(device), torch.cuda.current_stream(device)) if use_graph else (None, None)
    for step in range(st.steps):
        if step == st.measure_after or (step == 0 and st.steps <= st.measure_after):
            monitor.reset_peaks()  # measured peaks exclude the first steps' one-off allocations
            measured_from = len(monitor.samples)
        if use_graph and graph is None and step >= min(st.measure_after, st.steps - 1) and step >= 1:
            try:
                main.wait_stream(side)
                graph = _GraphedMicroStep(model, (st.batch_size, st.seq_len), device, st.grad_accum, regulariser,
                                          stream=side)
                graph_note = "on"
            except RuntimeError as exc:  # a kernel that cannot be captured: keep training eagerly
                use_graph, graph_note = False, f"capture failed, ran eagerly: {str(exc).splitlines()[0][:160]}"
                torch.cuda.synchronize(device)
        lr = st.lr * min(1.0, (step + 1) / st.warmup_steps) if st.warmup_steps else st.lr
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        measuring = step >= st.measure_after and graph is None
        on_side = use_graph and graph is None
        if on_side:  # the warm-up reads the parameters the previous update wrote on the default stream
            side.wait_stream(main)
        with torch.cuda.stream(side) if on_side else contextlib.nullcontext():
            # made on the stream that adds to it: a tensor of one stream used and freed on another can be reused by
            # the allocator while the other stream still reads it
            total = torch.zeros((), device=device)
            for _ in range(st.grad_accum):
                if graph is not None:
                    total = total + graph(next_batch())  # replays forward+backward: no Python per kernel
                    continue
                loss = model.loss(next_batch()) / st.grad_accum
                if measuring:
                    monitor.sample("forward")
                objective = loss + regulariser() / st.grad_accum if regulariser else loss
                objective.backward()  # frees each layer's recomputed activations as it goes
                total = total + loss.detach()
            if measuring:
                monitor.sample("backward")
        if on_side:
            # everything after the backward runs on the default stream, once the side stream's work is done:
            # bitsandbytes launches its optimizer kernels on the legacy default stream whatever stream is current,
            # and PyTorch's side streams do not synchronise with it — an update on the side stream would read
            # gradients the backward has not written yet (issue 14: "loss became nan at step 1"). The loss too is
            # read after this wait.
            main.wait_stream(side)
        if allocator:  # AdaLoRA: sensitivity from the unclipped gradient at the weights it was taken at
            allocator.observe(step)
        if st.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(opt_params, st.max_grad_norm)
        opt.step()
        if allocator:  # AdaLoRA: mask the updated λ to this step's budget, in place (outside any graph)
            allocator.allocate(step)
        # free gradient memory now instead of overwriting it next step; a graph needs its gradients to stay put
        opt.zero_grad(set_to_none=not flat)
        total = float(ranks.mean(total))  # synchronises: the step is complete (on every rank)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_seconds.append(time.perf_counter() - t0)
        monitor.sample("optimizer_step")
        if not math.isfinite(total):
            raise QtoolError(f"loss became {total} at step {step}", hint="lower --lr or check the data")
        losses.append(total)
        if progress:
            progress(step, total, step_seconds[-1])
        if st.eval_every and (step + 1) % st.eval_every == 0 and step + 1 < st.steps:
            curve.append([step + 1, held_out(f"at step {step + 1}")])  # eval mode, no gradients: the graph is untouched

    # --- result
    eval_after = held_out("after")
    curve.append([st.steps, eval_after])
    paged = sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
                if torch.is_tensor(t) and getattr(t, "is_paged", False))
    return TrainResult(adapter=None, device=str(device), optimizer=opt_name,
                       trainable_params=sum(p.numel() for p in params), losses=losses, step_seconds=step_seconds,
                       eval_loss=eval_after, eval_loss_before=eval_before, tokens_per_step=st.batch_size * st.seq_len * st.grad_accum,
                       paged_state_bytes=paged, cuda_graph=graph_note, memory=[s.to_json() for s in monitor.samples],
                       peaks={**monitor.peaks(measured_from or 0),
                              **({"pinned_host_bytes": model.offload.host_bytes()} if model.offload else {})},
                       settings=asdict(st), eval_curve=curve,
                       adalora=allocator.report() if allocator else {})


def run(model_dir, data, out, st: TrainSettings, *, overwrite: bool = False,
        progress: Callable[[int, float, float], None] | None = None,
        eval_progress: Callable[[str, int, int], None] | None = None, given=()) -> TrainResult:
    """The whole job of ``qtool train``: validate, load, pack the data, train, write the adapter atomically (PEFT's
    format for LoRA and prefix, qtool's for Houlsby adapters). ``given``: as :func:`check_inputs`. Under torchrun
    (``st.nproc`` = its WORLD_SIZE) every rank calls this: the model is sharded with FSDP2
    (:mod:`qtool.train.sharded`), and rank 0 alone reports progress and writes the adapter."""
    from qtool.train.distributed import is_main_process, join, torchrun_world_size

    # under torchrun only rank 0 checks --out (and restores what a killed run left): it alone writes there
    shape = check_inputs(model_dir, data, out if is_main_process() else None, st, overwrite=overwrite, given=given)
    if st.nproc != torchrun_world_size():
        raise UsageError(f"settings for {st.nproc} process(es) (nproc) in a run of {torchrun_world_size()} (torchrun's "
                         "WORLD_SIZE)", hint="set TrainSettings.nproc to WORLD_SIZE under torchrun; qtool train "
                                             "--nproc N starts torchrun itself")
    with join(resolve_device(st.device)) as (ranks, device):
        if not ranks.is_main:
            progress = eval_progress = None
        return _run(model_dir, data, out, st, shape, ranks, device, overwrite, progress, eval_progress)


def _run(model_dir, data, out, st: TrainSettings, shape, ranks: Ranks, device, overwrite, progress,
         eval_progress) -> TrainResult:
    from transformers import AutoTokenizer

    from qtool.format import peft_adapter as adapter_io
    from qtool.train.data import pack
    from qtool.train.load import compute_dtype_for, load_decoder

    model_dir = Path(model_dir)
    compute_dtype, why = compute_dtype_for(st.compute_dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks = pack(data, tokenizer, st.seq_len, st.eval_fraction, st.eval_blocks)
    initial = None
    if st.init in CONVERTER_INITS:
        initial = {m: (f.a, f.b) for m, f in adapter_io.load_adapter(model_dir / adapter_io.INIT_ADAPTER_DIR).modules.items()}
    load_args = dict(compute_dtype=compute_dtype, seed=st.seed, initial=initial)
    # before the weights' first allocation: the mode the run really has (a PYTORCH_CUDA_ALLOC_CONF decides)
    st = replace(st, expandable_segments=allocator_set_up(device, st.expandable_segments))
    if ranks.world_size > 1:  # each rank reads and keeps only its shards
        from qtool.train.sharded import gather_adapter, load_sharded_decoder

        model, base_names, shard = load_sharded_decoder(model_dir, st.spec, ranks, device=device, **load_args)
    else:
        model = load_decoder(model_dir, st.spec, device=device, **load_args)
    if st.method == "prefix" and not st.prefix_projection:
        init_prefix_from_text(model, blocks, st.prefix_len)
    try:
        result = train(model, blocks, st, device=device, progress=progress, eval_progress=eval_progress, ranks=ranks)
    except torch.cuda.OutOfMemoryError as exc:
        del model
        raise oom_error(shape, st, torch.cuda.get_device_properties(device).total_memory, model_dir) from exc
    result.compute_dtype = f"{str(compute_dtype).removeprefix('torch.')} ({why})"
    if ranks.world_size > 1:
        # the planner models one GPU holding the whole model: no comparison for a sharded run
        result.distributed = {"world_size": ranks.world_size, "backend": ranks.backend, "ranks": ranks.gather(shard)}
        gather_adapter(model, base_names, ranks)  # collective: the full adapter on rank 0
        if not ranks.is_main:
            return result
    else:
        result.plan_comparison = compare_with_plan(shape, st, result.memory, result.peaks)
    if st.method == "adalora":
        from qtool.adapters.budget import summarise

        result.adalora["summary"] = summarise(result.adalora["ranks"], result.adalora["init_rank"])
    log = {"qtool_train_log.json": json.dumps(result.to_json(), indent=1)}
    if out is not None and st.method == "adalora":
        from qtool.adapters.adalora import adalora_modules
        from qtool.adapters.budget import BUDGET_JSON, HEATMAP_PNG, heatmap_png
        from qtool.format.peft_adalora import save_adalora

        png, why = heatmap_png(result.adalora["summary"], title=f"AdaLoRA ranks, {model_dir.name}")
        result.adalora["heatmap"] = str(Path(out) / HEATMAP_PNG) if png else f"not written: {why}"
        result.adapter = save_adalora(
            out, adalora_modules(model), st.spec, base_dir=model_dir, overwrite=overwrite,
            extra_files={**log, BUDGET_JSON: json.dumps(result.adalora, indent=1),
                         **({HEATMAP_PNG: png} if png else {})})
    elif out is not None and st.method in UNTARGETED_METHODS:
        result.adapter = save_own_modules(out, model, st.spec, base_dir=model_dir, overwrite=overwrite, extra_files=log)
    elif out is not None:
        result.adapter = adapter_io.save_trained(
            out, {**model.lora_modules(), **model.vocab_lora_modules()}, st.spec, base_dir=model_dir, overwrite=overwrite, extra_files=log)
    return result


def init_prefix_from_text(model, blocks, prefix_len: int) -> None:
    """Start the prefix as the base model's keys and values of the first ``prefix_len`` tokens of the training text
    (Li & Liang §7.2: real words' activations; see :mod:`qtool.adapters.prefix`)."""
    from qtool.adapters.prefix import kv_of_tokens

    tokens = blocks.train.reshape(-1)[:prefix_len]
    if tokens.numel() < prefix_len:
        raise QtoolError(f"--prefix-len {prefix_len}: the training text has only {tokens.numel()} tokens to start "
                         "the prefix from", hint="give more text or a shorter --prefix-len")
    model.prefix.load_flat(kv_of_tokens(model, tokens))


def save_own_modules(out, model, spec, *, base_dir, overwrite: bool = False, extra_files=None) -> Path:
    """Write a Houlsby adapter (qtool's format) or a prefix (PEFT's PREFIX_TUNING) trained on ``model``."""
    if spec.method == "adapter":
        from qtool.adapters.attach import houlsby_modules
        from qtool.format.houlsby_adapter import save_houlsby

        return save_houlsby(out, houlsby_modules(model), spec, model.shape, base_dir=base_dir, overwrite=overwrite,
                            extra_files=extra_files)
    from qtool.format.prefix_adapter import save_prefix

    with torch.no_grad():
        flat = model.prefix.flat()
    return save_prefix(out, flat, model.shape, spec, base_dir=base_dir, overwrite=overwrite, extra_files=extra_files)


def oom_error(shape, st: TrainSettings, capacity: int, model_dir) -> QtoolError:
    """What ran out, by the plan: the largest line item at the peak, and the largest --seq-len and --batch-size
    that the planner says fit this GPU with the other settings unchanged."""
    from qtool.plan.planner import plan
    from qtool.plan.fit import largest_fitting

    settings = plan_settings(st)
    p = plan(shape, settings)
    big = max((r for r in p.rows if r.where == "device"), key=lambda r: r.bytes)
    seq = largest_fitting(shape, settings, capacity, "seq_len").value
    batch = largest_fitting(shape, settings, capacity, "batch_size").value
    return QtoolError(
        f"CUDA ran out of memory at --seq-len {st.seq_len} --batch-size {st.batch_size}: the plan puts the peak at "
        f"{p.peak_allocated_bytes / 2**30:.1f} GiB allocated ({p.peak_phase}) on a {capacity / 2**30:.1f} GiB GPU; "
        f"its largest item is {big.name!r} ({big.bytes / 2**30:.2f} GiB)",
        hint=(f"the planner says --seq-len {seq} (at --batch-size {st.batch_size}) or --batch-size {batch} (at "
              f"--seq-len {st.seq_len}) fit" if seq or batch else "even --seq-len 1 does not fit this GPU") +
        f"; details: qtool plan {model_dir} --seq-len {st.seq_len} --batch-size {st.batch_size} --fit {capacity}")
