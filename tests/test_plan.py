"""The planner: exact counts against bitsandbytes and PEFT, the hf activation model against an allocation trace of the
real stack on the CPU, inverse planning, validation, and the replay of measured peaks recorded in data/memory/."""
from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from tabulate import tabulate

from qtool.plan import transient as acts
from qtool.plan import resident as items
from qtool.arch import known_shape, resolve_model, shape_for_params, shape_from_config
from qtool.errors import UsageError
from qtool.plan.planner import BLOCKSIZES, PROFILES, Settings, plan
from qtool.plan.fit import GPUS, capacity_bytes, fits, knob_limit, largest_fitting
from qtool.plan.records import carried_allocated_bytes, carried_reserved_bytes, plan_for_record, record_process
from qtool.plan.allocator import CachingAllocator
from qtool.plan.process import replay

from test_arch import tiny_config

ROOT = Path(__file__).resolve().parents[1]


# --- weights -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 64), (300, 1000), (512, 1376), (7, 13)])
@pytest.mark.parametrize("block_size", [64, 128, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_equal_what_bitsandbytes_stores(shape, block_size, double_quant):
    import torch
    from bitsandbytes.functional import quantize_4bit

    weight = torch.randn(*shape, dtype=torch.bfloat16)
    packed, state = quantize_4bit(weight, blocksize=block_size, compress_statistics=double_quant, quant_type="nf4")
    tensors = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code, state.offset] if double_quant
                                            else [])
    assert items.nf4_tensor_bytes(weight.numel(), block_size, double_quant) == \
        (packed.nbytes, sum(t.nbytes for t in tensors))
    assert items.nf4_tensor_alloc(weight.numel(), block_size, double_quant) == \
        sum(items.alloc(t.nbytes) for t in [packed] + tensors)


def test_blocksizes_mirror_the_converter():
    from qtool.nf4.codec import BLOCKSIZES as converter_blocksizes

    assert BLOCKSIZES == converter_blocksizes


def test_fp16_weights_of_a_bare_count():
    p = plan(shape_for_params(65e9), Settings(rank=16))
    assert p.fp16_weights_bytes == 130_000_000_000
    # 4.127 bits per quantised parameter plus ~1.1 KB of code tables per tensor (QLoRA paper §3)
    n_linear = p.shape.n_linear_params()
    assert abs(p.nf4_weights_bytes - n_linear * (0.5 + 1 / 64 + 4 / (64 * 256))) < 1100 * 7 * 80 + 8 * 7 * 80


# --- LoRA parameters and optimizer state -------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma", "gemma3_text", "phi3", "gpt_neox"])
@pytest.mark.parametrize("targets", ["qkvo", "mlp", "all-linear", "per-module"])
def test_trainable_count_equals_peft(model_type, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    shape = shape_from_config(config.to_dict())
    names = [lin.name for lin in shape.linears()]
    if targets == "per-module":  # names with their own ranks: PEFT's rank_pattern
        spec = f"{names[0]},{names[-1]}=12,{names[-2]}=4"
        lora = LoraConfig(r=8, target_modules=[names[0], names[-1], names[-2]],
                          rank_pattern={names[-1]: 12, names[-2]: 4})
    else:
        spec = targets
        modules = "all-linear" if targets == "all-linear" else \
            [lin.name for lin in shape.linears() if lin.group == ("attn" if targets == "qkvo" else "mlp")]
        lora = LoraConfig(r=8, target_modules=modules)
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(config), lora)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert plan(shape, Settings(rank=8, targets=spec, seq_len=64)).n_trainable == trainable


@pytest.mark.parametrize("optimizer", ["adamw_32bit", "adamw_8bit"])
def test_optimizer_state_equals_bitsandbytes(optimizer):
    import torch
    import bitsandbytes as bnb

    sizes = [100, 4095, 4096, 5000, 200_000]
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    opt = (bnb.optim.Adam32bit if optimizer == "adamw_32bit" else bnb.optim.Adam8bit)(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    tensors = {t.data_ptr(): t for p in params for t in opt.state[p].values() if torch.is_tensor(t) and t.dim()}
    assert items.optimizer_state_bytes(sizes, optimizer) == (sum(items.alloc(t.nbytes) for t in tensors.values()), 0)


def test_allocator_booking_follows_the_caching_allocator_rules():
    """c10 CUDACachingAllocator: 512-byte rounding; blocks over 1 MiB below 10 MiB share 20 MiB segments, larger ones
    get their own segment rounded to 2 MiB; a block is split only if more than 1 MiB would remain, best fit first."""
    MiB = 2**20
    assert items.booked([100_000]) == items.alloc(100_000)
    assert items.booked([21 * MiB + MiB // 2]) == 22 * MiB  # 0.5 MiB left: the segment is not split
    assert items.booked([12 * MiB + MiB // 2]) == 12 * MiB + MiB // 2  # 1.5 MiB left: split, kept free
    assert items.booked([12 * MiB + MiB // 2, MiB + MiB // 16]) == 14 * MiB  # ... which the next one takes whole
    assert items.booked([2 * MiB] * 9) == 18 * MiB  # nine from one 20 MiB segment
    assert items.booked([2 * MiB] * 10) == 20 * MiB  # the tenth takes the last 2 MiB block whole


def test_allocator_replay_follows_the_caching_allocator_rules():
    """qtool.plan.allocator against c10's CUDACachingAllocator rules: its allocated bytes are booked()'s, small
    requests share 2 MiB segments, 1-10 MiB ones 20 MiB segments, larger ones get their own rounded to 2 MiB; a
    cached block serves only its stream (or graph pool), the smallest that fits first; freed neighbours merge;
    empty_cache returns wholly free segments only, so one live block keeps its segment's free space reserved."""
    MiB = 2**20
    for sizes in ([100_000], [21 * MiB + MiB // 2], [12 * MiB + MiB // 2], [12 * MiB + MiB // 2, MiB + MiB // 16],
                  [2 * MiB] * 9, [2 * MiB] * 10):
        a = CachingAllocator()
        for n in sizes:
            a.malloc(n)
        assert a.allocated_bytes == items.booked(sizes)
    a = CachingAllocator()
    small, mid, big = a.malloc(1000), a.malloc(3 * MiB), a.malloc(33 * MiB)
    assert a.reserved_bytes == (2 + 20 + 34) * MiB and a.allocated_bytes == 512 * 2 + 3 * MiB + 34 * MiB
    a.free(big)
    a.malloc(30 * MiB, "side")  # another stream: a segment of its own
    assert a.reserved_bytes == (2 + 20 + 34 + 30) * MiB
    reused = a.malloc(30 * MiB)  # its own stream: the cached 34 MiB block, split (4 MiB left)
    assert a.reserved_bytes == (2 + 20 + 34 + 30) * MiB and reused.size == 30 * MiB
    fits_best = [a.malloc(n) for n in (40 * MiB, 50 * MiB)]
    a.free(fits_best[0]), a.free(fits_best[1])
    assert a.malloc(35 * MiB).segment is fits_best[0].segment  # the smallest free block that holds it
    a.free(reused)
    a.empty_cache()  # the 34 and 50 MiB segments are wholly free and go; the 20 MiB one keeps its 17 MiB free
    assert a.segment_bytes("default") == (2 + 20 + 40) * MiB
    a.free(mid)
    a.empty_cache()
    assert a.segment_bytes("default") == 2 * MiB + 40 * MiB and a.segment_bytes("side") == 30 * MiB


@pytest.mark.parametrize("profile", ["qtool", "hf", "hf-prepare"])
@pytest.mark.parametrize("name,settings", [
    ("llama-2-7b", {"seq_len": 2048}), ("llama-3-8b", {"seq_len": 8192, "targets": "all-linear", "rank": 8}),
    ("qwen2.5-0.5b", {"seq_len": 4096, "grad_checkpointing": False, "rank": 32}),
    ("llama-2-7b", {"seq_len": 512, "batch_size": 4, "targets": "all-linear"}), ("phi-3-mini", {"seq_len": 2048}),
    ("llama-2-7b", {"seq_len": 2048, "flat_params": False}), ("llama-2-7b", {"seq_len": 2048,
                                                                           "offload_activations": True})])
def test_allocator_replay_reaches_the_planned_peak(profile, name, settings):
    """The replayed step (qtool/plan/trace.py, tensor by tensor) and the transient formulas (qtool/plan/transient.py,
    moment by moment) read the same code: their peaks allocated agree within 2.5% (Phi-3's fused products are traced
    as the Llama ones)."""
    if profile != "qtool" and {"flat_params", "offload_activations"} & set(settings):
        pytest.skip("a qtool trainer setting")
    shape = known_shape(name)
    p = plan(shape, Settings(profile=profile, **settings))
    replayed = replay(shape, p.settings).peak_allocated_bytes
    assert abs(replayed - p.peak_allocated_bytes) / p.peak_allocated_bytes < 0.025, (replayed, p.peak_allocated_bytes)
    assert p.peak_allocated_bytes < p.peak_reserved_bytes < 1.3 * p.peak_allocated_bytes


def test_attention_kernel_is_the_one_sdpa_picks():
    """bf16 (qtool): flash, and efficient with k/v repeated beyond a sliding window (qtool's own mask). fp32 (hf):
    efficient for equal heads or k/v repeated by transformers (it does so when it has a mask, here Mistral's sliding
    window at seq >= 4096), math for GQA passed to SDPA as enable_gqa."""
    def kernel(name, **settings):
        return acts.attention_kernel(known_shape(name), Settings(**settings).check(known_shape(name)))

    assert kernel("llama-3-8b") == "flash" and kernel("mistral-7b", seq_len=4096) == "flash"
    assert kernel("mistral-7b", seq_len=4097) == "efficient"
    assert kernel("llama-2-7b", profile="hf") == "efficient"
    assert kernel("llama-3-8b", profile="hf") == "math"
    assert kernel("mistral-7b", profile="hf", seq_len=2048) == "math"
    assert kernel("mistral-7b", profile="hf", seq_len=4096) == "efficient"
    assert kernel("llama-3-8b", profile="hf", attention="flash") == "flash"


def test_paged_state_only_for_large_tensors():
    device, paged = items.optimizer_state_bytes([99_999, 100_000], "paged_adamw_32bit")
    assert device == 2 * items.alloc(4 * 99_999)
    assert paged == 2 * 4 * 100_000 + 2 * (items.PAGED_GRANULARITY_BYTES - 400_000 % items.PAGED_GRANULARITY_BYTES)
    assert items.optimizer_state_bytes([10**6], "sgd") == (0, 0)


# --- activations against the real hf stack -----------------------------------------------------------------------

@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: what it traces is the same with one or two (checked for every trace
    test here) and cannot depend on the machine's core count; on a shared 2-core machine two threads waiting for each
    other made these tests 5-10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _traced_peak(step) -> int:
    """Peak of live CPU tensor bytes created during one call of ``step`` (after one warm-up call, so optimizer state
    already exists, as in every later step), from the profiler's allocation events.

    Both calls run on one intra-op thread (see ``one_thread``; set again before each call, in case a first parallel
    launch elsewhere resets OpenMP's thread count)."""
    import torch
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        step()
        torch.set_num_threads(1)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    finally:
        torch.set_num_threads(threads)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack += event.children
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


PERSISTENT_ROWS = ("NF4", "embeddings", "lm_head", "norms", "LoRA adapters", "allocator rounding", "optimizer",
                   "cuBLAS")


def _traced_sgd_step(model, ids, gc: bool) -> int:
    """:func:`_traced_peak` of one training step of ``model`` (a qtool Decoder on the CPU) on ``ids``: loss, backward,
    an SGD step on the trainable parameters, gradients freed."""
    import torch

    model.train()
    model.grad_checkpointing = gc
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        model.loss(ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _traced_peak(step)


def _planned_transient(shape, settings) -> tuple[int, str]:
    """The plan's allocated bytes beyond what exists before a step (weights, adapters, optimizer state)."""
    p = plan(shape, settings)
    return sum(r.bytes for r in p.rows if r.counter == "allocated" and not r.name.startswith(PERSISTENT_ROWS)), \
        p.peak_phase


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A bf16 Llama checkpoint small enough for the CPU (hidden 256, 2 layers, vocab 2000)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = tiny_config("llama", hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=2000)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    return path


def hf_stack(path: Path, targets: str, rank: int, gc: bool, recipe: str = "hf"):
    """transformers + PEFT + bitsandbytes on the CPU, set up as bench/gpu_worker.py does on the GPU:
    prepare_model_for_kbit_training with its defaults, then checkpointing on or off, then get_peft_model. ``recipe``
    hf-prepare leaves the checkpointing that prepare_model_for_kbit_training enabled (reentrant) as it is."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    warnings.filterwarnings("ignore")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map="cpu", attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model)
    if not gc:
        model.gradient_checkpointing_disable()
    elif recipe == "hf":
        model.gradient_checkpointing_enable()
    # the Linears of the layers, and embed_tokens / lm_head when asked (module_ranks names the layers' only)
    names = list(Settings(targets=targets).module_ranks(resolve_model(str(path)))) + \
        [t for t in targets.split(",") if t in ("embed_tokens", "lm_head")]
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=names, lora_dropout=0.0))
    model.train()
    return model


def _allocated(tensors) -> int:
    """Bytes the CUDA caching allocator would book for these tensors (each storage once, rounded to 512)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(items.alloc(n) for n in storages.values())


def test_resident_bytes_equal_the_hf_stack(tiny_checkpoint):
    """After loading: every parameter, buffer and QuantState tensor bitsandbytes keeps, byte for byte."""
    model = hf_stack(tiny_checkpoint, "q_proj,down_proj", rank=8, gc=True)
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        qs = getattr(getattr(module, "weight", None), "quant_state", None)
        if qs is not None:
            tensors += [qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
    p = plan(resolve_model(str(tiny_checkpoint)), Settings(profile="hf", rank=8, targets="q_proj,down_proj"))
    assert p.after_load_allocated_bytes == _allocated(tensors)  # too small for unsplit allocator blocks


def test_resident_bytes_equal_the_qtool_trainer():
    from qtool.adapters.spec import AdapterSpec
    from qtool.train.load import random_decoder
    from qtool.train.settings import decoder_shape

    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}
    model = random_decoder(decoder_shape(config), "cpu", spec=AdapterSpec("q_proj,down_proj", rank=8))
    p = plan(shape_from_config(config), Settings(rank=8, targets="q_proj,down_proj"))
    assert p.after_load_allocated_bytes == _allocated(list(model.parameters()) + list(model.buffers()))


@pytest.mark.parametrize("gc,targets,seq_len,batch_size", [(False, "qkvo", 384, 1), (True, "qkvo", 384, 1),
                                                          (True, "all-linear", 200, 2)])
def test_hf_transient_matches_allocation_trace(one_thread, tiny_checkpoint, gc, targets, seq_len, batch_size):
    """transformers + PEFT + bitsandbytes, set up as bench/gpu_worker.py does, run on the CPU: the bytes created
    during a step (activations, logits, gradients, dequantised weights) must match the plan's transient rows for
    the CPU (``device="cpu"``: no cuBLAS workspaces). fp32 non-GQA attention runs efficient SDPA on CUDA and flash
    on the CPU; both keep q, k, v, out and the logsumexp. The GPU-only terms (the math kernel's third s^2 tensor)
    are checked by the records (test_replays_recorded_measurements)."""
    import torch
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = hf_stack(tiny_checkpoint, targets, rank=16, gc=gc)
    shape = resolve_model(str(tiny_checkpoint))
    optimizer = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, shape.vocab, (batch_size, seq_len))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    traced = _traced_peak(step)
    planned, phase = _planned_transient(shape, Settings(profile="hf", rank=16, targets=targets, seq_len=seq_len,
                                                        batch_size=batch_size, grad_checkpointing=gc, device="cpu"))
    assert abs(planned - traced) / traced < 0.02, (planned, traced, phase)


@pytest.mark.parametrize("gc", [False, True])
def test_hf_math_attention_matches_allocation_trace(one_thread, tmp_path_factory, gc):
    """GQA in fp32 (the hf profile on Llama 3, SmolLM2, Qwen2.5): transformers passes enable_gqa, and CUDA's only
    kernel for it is the math one, forced here on the CPU too. Its s^2 probabilities and repeated k, v are planned as
    traced; on CUDA the softmax backward adds one more s^2 tensor (grad * probs), which the H200 records show."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny-gqa")
    torch.manual_seed(0)
    config = tiny_config("llama", hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    model = hf_stack(path, "qkvo", rank=16, gc=gc)
    shape = resolve_model(str(path))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, shape.vocab, (1, 1024))

    def step():
        with sdpa_kernel(SDPBackend.MATH):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    traced = _traced_peak(step)
    settings = Settings(profile="hf", rank=16, seq_len=1024, grad_checkpointing=gc, optimizer="sgd", device="cpu")
    assert acts.attention_kernel(shape, settings.check(shape)) == "math"
    planned, phase = _planned_transient(shape, settings)
    assert abs(planned - traced) / traced < 0.02, (planned, traced, phase)


@pytest.fixture(scope="module")
def small_vocab_checkpoints(tmp_path_factory) -> dict[int, Path]:
    """bf16 Llama checkpoints whose layers, not the logits, make the peak (vocab 300), by key-value heads: 4 (as
    many as the query heads) and 2 (GQA)."""
    import torch
    from transformers import AutoModelForCausalLM

    paths = {}
    for kv_heads in (4, 2):
        paths[kv_heads] = tmp_path_factory.mktemp(f"tiny-kv{kv_heads}")
        torch.manual_seed(0)
        config = tiny_config("llama", hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=300)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(paths[kv_heads])
    return paths


def _traced_hf_step(path: Path, recipe: str, targets: str, seq_len: int, batch_size: int, gc: bool) -> tuple[int, str]:
    """(traced peak, grad_fn of the first decoder layer's output) of one SGD step of ``recipe`` on the CPU; GQA
    attention runs SDPA's math kernel, CUDA's only one for it in fp32 (see
    test_hf_math_attention_matches_allocation_trace)."""
    import contextlib

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = hf_stack(path, targets, rank=16, gc=gc, recipe=recipe)
    shape = resolve_model(str(path))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, shape.vocab, (batch_size, seq_len))
    grad_fns = []
    layer = model.get_base_model().model.layers[0]
    layer.register_forward_hook(lambda module, args, out: grad_fns.append(type(out.grad_fn).__name__))
    math = shape.n_kv_heads != shape.n_heads

    def step():
        with sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext():
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _traced_peak(step), grad_fns[-1]


@pytest.mark.parametrize("gc,targets,seq_len,batch_size,kv_heads,n_hidden,trace_hf", [
    (True, "qkvo", 384, 1, 4, 1, True), (True, "qkvo", 1024, 1, 2, 2, True), (True, "all-linear", 200, 2, 4, 1, False),
    (False, "qkvo", 384, 1, 4, 0, False)], ids=["mlp-moment", "gqa-attention-moment", "all-linear-b2", "no-gc"])
def test_hf_prepare_transient_matches_allocation_trace(one_thread, small_vocab_checkpoints, gc, targets, seq_len,
                                                       batch_size, kv_heads, n_hidden, trace_hf):
    """The prepare-only recipe (prepare_model_for_kbit_training, get_peft_model, a loop) on the CPU: its checkpointing
    is torch's reentrant CheckpointFunction, and its peak is planned within 2%. The plan puts ``n_hidden`` fp32 hidden
    states on top of the hf recipe's: one (the recomputed layer output) when the peak is in the MLP's backward, two
    (the residual gradient summed out of place too) in the attention's, none without checkpointing (one step then).
    With ``trace_hf`` the hf recipe is traced too, and the traces differ by the same bytes."""
    path = small_vocab_checkpoints[kv_heads]
    shape = resolve_model(str(path))
    traced, grad_fn = _traced_hf_step(path, "hf-prepare", targets, seq_len, batch_size, gc)
    assert (grad_fn == "CheckpointFunctionBackward") == gc, grad_fn
    settings = Settings(profile="hf-prepare", rank=16, targets=targets, seq_len=seq_len, batch_size=batch_size,
                        grad_checkpointing=gc, optimizer="sgd", device="cpu")
    planned, phase = _planned_transient(shape, settings)
    assert abs(planned - traced) / traced < 0.02, (planned, traced, phase)
    planned_hf, _ = _planned_transient(shape, replace(settings, profile="hf"))
    hidden = 4 * shape.hidden * batch_size * seq_len
    assert planned - planned_hf == n_hidden * hidden
    if trace_hf:
        traced_hf, grad_fn_hf = _traced_hf_step(path, "hf", targets, seq_len, batch_size, gc)
        assert grad_fn_hf != "CheckpointFunctionBackward"
        assert abs(traced - traced_hf - n_hidden * hidden) < 64, (traced - traced_hf, n_hidden * hidden)


def test_hf_prepare_against_hf_on_measured_shapes():
    """The two hf recipes on the shapes of the H200 records (r16 q,k,v,o, checkpointing, batch 1): the prepare-only
    loop differs by the reentrant checkpoint's one or two fp32 hidden states in the layer backward, and not at all
    where the loss backward is the peak; the recipe is named in the notes."""
    rows = []
    for name, seq_len in (("llama-2-7b", 512), ("llama-2-7b", 2048), ("llama-3-8b", 2048), ("llama-3-8b", 8192),
                          ("mistral-7b", 4096)):
        shape = known_shape(name)
        hf, prep = (plan(shape, Settings(profile=profile, seq_len=seq_len)) for profile in ("hf", "hf-prepare"))
        hidden = 4 * shape.hidden * seq_len
        assert prep.peak_allocated_bytes - hf.peak_allocated_bytes in (0, hidden, 2 * hidden), name
        assert any(note.startswith("profile hf-prepare: ") and "reentrant" in note for note in prep.notes)
        rows.append((name, seq_len, f"{hf.peak_allocated_bytes / 2**30:.3f}", hf.peak_phase,
                     f"{prep.peak_allocated_bytes / 2**30:.3f}", prep.peak_phase,
                     f"{prep.peak_allocated_bytes / hf.peak_allocated_bytes - 1:+.2%}"))
    print("\n" + tabulate(rows, headers=("model", "seq", "hf GiB", "hf peak phase", "hf-prepare GiB",
                                         "hf-prepare peak phase", "difference"), disable_numparse=True))
    st = Settings(profile="hf-prepare", grad_checkpointing=False)
    assert plan(known_shape("llama-2-7b"), st).peak_allocated_bytes == \
        plan(known_shape("llama-2-7b"), replace(st, profile="hf")).peak_allocated_bytes


@pytest.mark.parametrize("gc,targets,seq_len,batch_size,vocab,kv_heads,hidden", [
    (False, "qkvo", 384, 1, 2000, 4, 256), (True, "all-linear", 300, 2, 2000, 4, 256),
    (True, "qkvo", 1024, 1, 70000, 4, 64), (False, "all-linear", 512, 1, 300, 4, 256),
    (False, "qkvo", 256, 2, 1000, 2, 256)])
def test_qtool_transient_matches_allocation_trace(one_thread, gc, targets, seq_len, batch_size, vocab, kv_heads,
                                                  hidden):
    """qtool's trainer (qtool.train.model) on the CPU: one chunk and several, the final-norm-dominated case (small
    vocabulary), GQA. The two-chunk case (70000 x 512 fp32 logits per chunk, which dominate its peak) uses hidden 64:
    its cost is the head's bf16 matmuls, emulated on CPUs without bf16 instructions. The CPU takes the torch
    reference paths (qtool.train.fused *_ref, qtool.nf4.codec dequantisation, eager steps with gradients freed), which
    ``device="cpu"`` plans; the GPU paths (Triton kernels, flash SDPA, CUDA graph) are checked against the H200
    records in test_replays_recorded_measurements."""
    config = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": hidden * 11 // 4,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": kv_heads, "vocab_size": vocab}
    _check_qtool_trace(config, gc, targets, seq_len, batch_size)


@pytest.mark.parametrize("gc,extra", [
    (False, {"model_type": "qwen3", "head_dim": 128}), (True, {"model_type": "qwen3", "head_dim": 128}),
    (False, {"model_type": "mistral", "sliding_window": 96}), (True, {"model_type": "mistral", "sliding_window": 96}),
    (False, {"model_type": "phi3"}), (True, {"model_type": "phi3", "partial_rotary_factor": 0.5})],
    ids=["qwen3", "qwen3-gc", "window", "window-gc", "phi3", "phi3-gc"])
def test_qtool_transient_of_other_architectures_matches_allocation_trace(one_thread, gc, extra):
    """The same check for what the other architectures add: Qwen3's q/k norms (head_dim 128 != hidden / heads), a
    sliding window shorter than the sequence (its bool mask, the efficient kernel's 16-bit copy of it per layer, k
    and v repeated), Phi-3's fused qkv_proj and gate_up_proj."""
    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2000, **extra}
    _check_qtool_trace(config, gc, "all-linear" if gc else "qkvo", 384, 1)


def _check_qtool_trace(config: dict, gc: bool, targets: str, seq_len: int, batch_size: int) -> None:
    import torch
    from qtool.adapters.spec import AdapterSpec
    from qtool.train.load import random_decoder
    from qtool.train.settings import decoder_shape

    warnings.filterwarnings("ignore")
    vocab = config["vocab_size"]
    shape = shape_from_config(config)
    names = tuple(lin.name for lin in shape.linears() if targets == "all-linear" or lin.group == "attn")
    model = random_decoder(decoder_shape(config), "cpu", spec=AdapterSpec(",".join(names), rank=16))
    traced = _traced_sgd_step(model, torch.randint(0, vocab, (batch_size, seq_len)), gc)
    planned, phase = _planned_transient(shape, Settings(rank=16, targets=targets, seq_len=seq_len, optimizer="sgd",
                                                        batch_size=batch_size, grad_checkpointing=gc, device="cpu"))
    assert abs(planned - traced) / traced < 0.02, (planned, traced, phase)


@pytest.mark.parametrize("targets,seq_len,batch_size,kv_heads", [("all-linear", 300, 2, 4), ("qkvo", 384, 1, 2)])
def test_qtool_offloaded_step_matches_allocation_trace(one_thread, targets, seq_len, batch_size, kv_heads):
    """--offload-activations on the CPU, where the "host" buffers are ordinary CPU tensors: made in the warm-up call,
    so the traced step sees only what the GPU would (the copies back, the recomputed output) and must match the plan
    without the checkpoint row; and the step without offloading traces exactly the 4 layer inputs more."""
    import torch
    from qtool.adapters.spec import AdapterSpec
    from qtool.train.load import random_decoder
    from qtool.train.offload import ActivationOffload
    from qtool.train.settings import decoder_shape

    warnings.filterwarnings("ignore")
    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": kv_heads, "vocab_size": 2000}
    shape = shape_from_config(config)
    names = tuple(lin.name for lin in shape.linears() if targets == "all-linear" or lin.group == "attn")
    ids = torch.randint(0, 2000, (batch_size, seq_len))
    traced = {}
    for offload in (False, True):
        model = random_decoder(decoder_shape(config), "cpu", spec=AdapterSpec(",".join(names), rank=16))
        model.offload = ActivationOffload() if offload else None
        traced[offload] = _traced_sgd_step(model, ids, True)
    planned, phase = _planned_transient(shape, Settings(rank=16, targets=targets, seq_len=seq_len, optimizer="sgd",
                                                        batch_size=batch_size, device="cpu", offload_activations=True))
    assert abs(planned - traced[True]) / traced[True] < 0.02, (planned, traced[True], phase)
    inputs = 4 * batch_size * seq_len * 256 * 2  # layers x tokens x hidden x bf16
    assert abs(traced[False] - traced[True] - inputs) / inputs < 0.01, (traced, inputs)


def _planned_step_bytes(shape, settings) -> tuple[int, str]:
    """As _planned_transient, with the adapter gradients made during the step counted (the embedding's backward,
    the step's last, holds every one of them)."""
    p = plan(shape, settings)
    return sum(r.bytes for r in p.rows if r.counter == "allocated" and (not r.name.startswith(PERSISTENT_ROWS)
                                                                        or "gradients" in r.name)), p.peak_phase


@pytest.mark.parametrize("targets,rank,gc,seq_len,batch_size,vocab,tied,phase", [
    ("q_proj,v_proj,lm_head", 16, False, 384, 1, 2000, False, "loss backward"),  # the head's saved and loss rows
    ("q_proj,embed_tokens,lm_head", 16, True, 300, 2, 2000, True, "loss backward"),  # one shared adapter
    ("q_proj,embed_tokens", 64, False, 16, 1, 30000, False, "input-embedding LoRA (embed_tokens) backward"),
])
def test_qtool_vocab_adapters_match_allocation_trace(one_thread, targets, rank, gc, seq_len, batch_size, vocab, tied,
                                                     phase):
    """qtool's trainer with LoRA on embed_tokens / lm_head (qtool/plan/vocab.py rows) on the CPU, including the
    phase where the embedding's backward (A's dense gradient beside every adapter gradient) is the peak."""
    import torch
    from qtool.adapters.spec import AdapterSpec
    from qtool.train.load import random_decoder
    from qtool.train.settings import decoder_shape

    warnings.filterwarnings("ignore")
    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": vocab, "tie_word_embeddings": tied}
    shape = shape_from_config(config)
    model = random_decoder(decoder_shape(config), "cpu", spec=AdapterSpec(targets, rank=rank))
    traced = _traced_sgd_step(model, torch.randint(0, vocab, (batch_size, seq_len)), gc)
    planned, got_phase = _planned_step_bytes(shape, Settings(rank=rank, targets=targets, seq_len=seq_len, optimizer="sgd",
                                                             batch_size=batch_size, grad_checkpointing=gc, device="cpu"))
    assert got_phase == phase
    assert abs(planned - traced) / traced < 0.02, (planned, traced, got_phase)


@pytest.mark.parametrize("targets", ["q_proj,lm_head", "q_proj,embed_tokens"])
def test_hf_vocab_adapters_match_allocation_trace(one_thread, tiny_checkpoint, targets):
    """PEFT's LoRA on lm_head (a Linear on the fp32 head) and embed_tokens on the hf stack, on the CPU."""
    import torch

    model = hf_stack(tiny_checkpoint, targets, 16, gc=True)
    shape = resolve_model(str(tiny_checkpoint))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, shape.vocab, (1, 384))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    traced = _traced_peak(step)
    planned, phase = _planned_step_bytes(shape, Settings(profile="hf", rank=16, targets=targets, seq_len=384,
                                                         optimizer="sgd", device="cpu"))
    assert abs(planned - traced) / traced < 0.02, (planned, traced, phase)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("targets", ["q_proj,lm_head", "v_proj,embed_tokens=8", "q_proj,embed_tokens,lm_head"])
def test_vocab_adapter_counts_equal_peft(tied, targets):
    """Trainable parameters with embed_tokens / lm_head, as PEFT counts them; on a tied model both together are
    PEFT's ensure_weight_tying adapter (counted once), either alone an adapter of its own side."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    warnings.filterwarnings("ignore")
    config = tiny_config("llama", tie_word_embeddings=tied)
    shape = shape_from_config(config.to_dict())
    items_ = [t.partition("=") for t in targets.split(",")]
    lora = LoraConfig(r=4, target_modules=[n for n, _, _ in items_],
                      rank_pattern={n: int(r) for n, _, r in items_ if r},
                      ensure_weight_tying=tied and "embed_tokens" in targets and "lm_head" in targets)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), lora)
    # by storage: PEFT's tied head holds Parameters that are views of the embedding's (its own count has them twice)
    trainable = sum({p.data_ptr(): p.numel() for p in model.parameters() if p.requires_grad}.values())
    p = plan(shape, Settings(rank=4, targets=targets, seq_len=64, flat_params=False))  # per-tensor rows
    assert p.n_trainable == trainable
    adapter_row = next(r for r in p.rows if r.name.startswith("LoRA adapters ("))
    assert adapter_row.bytes == items.tensors_alloc(items.lora_tensors(shape, p.settings), 4)


def test_hf_head_lora_forward_moment_is_logits_sized():
    """PEFT's head LoRA makes two more fp32 logits-sized tensors in the forward (12 T V bytes at that moment), which
    qtool's chunked loss never does (its head rows are (tokens x r) and (vocab x r) sized)."""
    from qtool.plan import vocab

    shape = resolve_model("llama-2-7b")
    hf = Settings(profile="hf", targets="q_proj,lm_head", seq_len=2048).check(shape)
    ours = Settings(targets="q_proj,lm_head", seq_len=2048).check(shape)
    assert vocab.head_forward_bytes(shape, hf) == 3 * 4 * 2048 * 32000
    assert vocab.head_forward_bytes(shape, ours) == 0
    assert "head LoRA (lm_head) forward" in _phases_of(shape, hf) and "head LoRA (lm_head) forward" not in \
        _phases_of(shape, ours)
    r = 16
    assert vocab.head_saved_bytes(shape, ours, 2047) == items.alloc(2 * r * 2047) + items.alloc(2 * 32000 * r) \
        + items.alloc(2 * r * 4096)
    assert vocab.head_loss_bytes(shape, ours, 2047) == items.alloc(4 * 32000 * r) + items.alloc(2 * 32000 * r) \
        + items.alloc(2 * r * 2047)


def _phases_of(shape, st) -> set[str]:
    from qtool.plan.planner import _phases

    return set(_phases(shape, st, 0, items.lora_tensors(shape, st)))


def test_loss_chunk_rule_mirrors_the_trainer():
    from qtool.train.loss import loss_chunk_tokens

    for vocab in (300, 32000, 49152, 128256, 151936, 262208):
        assert acts.loss_chunk_tokens(vocab) == loss_chunk_tokens(vocab)
        for mib in (64, 256):
            assert acts.loss_chunk_tokens(vocab, mib) == loss_chunk_tokens(vocab, mib)
    assert loss_chunk_tokens(32000) == 512 and loss_chunk_tokens(32000, 256) == 2048


# --- validation and inverse planning -----------------------------------------------------------------------------

def test_validation_reports_every_problem_at_once():
    bad = Settings(profile="hf", rank=0, seq_len=0, optimizer="adam", block_size=100, loss="chunked",
                   targets="q_proj,nope", adapter_dtype="int8")
    with pytest.raises(UsageError) as err:
        plan(known_shape("llama-2-7b"), bad)
    assert len(err.value.problems) == 7, err.value.problems
    assert "did you mean" not in str(err.value) or "nope" in str(err.value)
    with pytest.raises(UsageError, match="exceeds min"):
        plan(known_shape("qwen2.5-0.5b"), Settings(targets="k_proj=256"))


@pytest.mark.parametrize("knob", ["seq_len", "batch_size", "rank"])
def test_largest_fitting_is_the_boundary(knob):
    shape, st = known_shape("llama-3.1-8b"), Settings(targets="all-linear", seq_len=1024)
    _, capacity = capacity_bytes("24GB")
    fit = largest_fitting(shape, st, capacity, knob)
    assert fit.value and fits(fit.plan, capacity) and not fit.limited and fit.value < fit.limit
    assert not fits(plan(shape, replace(st, **{knob: fit.value + 1})), capacity)
    assert (fit.limit, fit.limit_reason) == knob_limit(shape, st, knob) == {
        "seq_len": (131072, "max_position_embeddings of llama-3.1-8b"), "batch_size": (65536, "search bound"),
        "rank": (1024, "min(in, out) of k_proj")}[knob]  # GQA: k_proj is 4096 -> 8 x 128


@pytest.mark.parametrize("name,profile,limit,reason", [
    ("smollm2-135m", "qtool", 8192, "max_position_embeddings of smollm2-135m"),
    ("llama-2-7b", "hf", 4096, "max_position_embeddings of llama-2-7b"),
    ("mistral-7b", "qtool", 32768, "max_position_embeddings of mistral-7b"),
    ("mistral-7b", "hf", 32768, "max_position_embeddings of mistral-7b")])
def test_seq_len_search_stops_at_the_model_limit(name, profile, limit, reason):
    """No seq-len beyond the positions a model has (an H200 has memory for far more of these short-context
    models); a sliding window is no limit: both trainers apply it."""
    shape, st = known_shape(name), Settings(profile=profile)
    fit = largest_fitting(shape, st, GPUS["H200"] * 2**20, "seq_len")
    assert (fit.value, fit.limited, fit.limit) == (limit, True, limit) and reason in fit.limit_reason
    assert fits(fit.plan, GPUS["H200"] * 2**20) and fit.plan.settings.seq_len == limit


def test_peak_grows_with_each_knob():
    shape = known_shape("llama-3-8b")
    for profile in PROFILES:
        for knob, values in {"seq_len": (256, 512, 2048, 8192), "batch_size": (1, 2, 4), "rank": (8, 16, 64)}.items():
            peaks = [plan(shape, Settings(profile=profile, **{knob: v})).peak_allocated_bytes for v in values]
            assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks), (profile, knob, peaks)


def test_gpu_names_and_sizes():
    assert capacity_bytes("h200") == ("H200", 143771 * 2**20)
    assert capacity_bytes("RTX-4090") == ("RTX 4090", 24564 * 2**20)
    assert capacity_bytes("24GB") == ("24GB", 24 * 10**9) and capacity_bytes("24 gb")[1] == 24 * 10**9
    assert capacity_bytes("24GiB")[1] == capacity_bytes("24Gi")[1] == capacity_bytes("24gib")[1] == 24 * 2**30
    assert capacity_bytes("1.5TiB")[1] == 3 * 2**39 and capacity_bytes("512Mi")[1] == 512 * 2**20
    with pytest.raises(UsageError, match="did you mean"):
        capacity_bytes("A100-40")


# --- measurement records (data/memory/*.json) ---------------------------------------------------------------------

EXAMPLE_RECORD = {
    "id": "qtool-llama2-7b-s512-r16-qkvo-gc", "profile": "qtool",
    "model": {"name": "llama-2-7b", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "vocab_size": 32000,
              "tie_word_embeddings": False, "model_type": "llama"},
    "settings": {"rank": 16, "alpha": 32, "targets": "qkvo", "seq_len": 512, "batch_size": 1,
                 "grad_checkpointing": True, "optimizer": "paged_adamw_32bit", "double_quant": True,
                 "block_size": 64, "compute_dtype": "bfloat16", "adapter_dtype": "float32", "attention": "sdpa",
                 "loss": "chunked"},
    "trainable_params": 16_777_216,  # 32 layers x 4 modules x 16 x (4096 + 4096)
}


def test_plan_for_record_plans_the_recorded_configuration():
    p = plan_for_record(EXAMPLE_RECORD)
    assert p.n_trainable == EXAMPLE_RECORD["trainable_params"]
    assert p.shape.n_params() == 6_738_415_616 and p.settings.seq_len == 512


def _records() -> list[dict]:
    return [r for f in sorted((ROOT / "data" / "memory").glob("*.json")) for r in json.loads(f.read_text())]


def _earlier_runs(records: list[dict]) -> list[list[dict]]:
    """Per record, the records of the runs before it in its process: bench/gpu_worker.py runs every configuration of
    one (profile, model) in one process, in the order the records are written."""
    seen: dict[tuple, list[dict]] = {}
    out = []
    for r in records:
        earlier = seen.setdefault((r.get("date"), r["profile"], r["model"].get("name")), [])
        out.append(list(earlier))
        earlier.append(r)
    return out


def test_recorded_after_load_is_the_planned_resident_bytes():
    """The first run of each process starts with exactly the plan's resident bytes allocated (weights, adapters, the
    allocator's unsplit blocks; within 1 MiB: the bench builds its random weights through temporaries a checkpoint
    load does not make). Every later qtool run starts with the cuBLAS workspaces its predecessors left on top: 5
    after the first (its warm-up stream and CUDA-graph capture stream, each in the forward and the autograd thread,
    and the evaluation's on the default stream), then 2 more per run (each run's new warm-up stream). hf runs carry
    their predecessor's autograd graph instead, which their first step frees (see carried_allocated_bytes). The
    allocator replay (qtool/plan/process.py) starts every run with the measured bytes, within 1 MiB but for hf's
    carried graph (planned as the earlier run's LoRA factors and two hidden states: within 60 MiB)."""
    records = [r for r in _records() if not r.get("error")]
    for r, earlier in zip(records, _earlier_runs(records)):
        p, m = plan_for_record(r), r["measured"]
        carried = m["after_load_allocated_bytes"] - p.after_load_allocated_bytes
        if not earlier:
            assert abs(carried) <= 2**20, (r["id"], carried)
        elif r["profile"] == "qtool":
            assert abs(carried - (2 * len(earlier) + 3) * items.CUBLAS_WORKSPACE_BYTES) <= 2**20, (r["id"], carried)
            assert carried_allocated_bytes(r, p) == carried - 2 * items.CUBLAS_WORKSPACE_BYTES
        replayed = replay(p.shape, p.settings, record_process(r, earlier)).after_load_allocated_bytes
        slack = 60 * 2**20 if earlier and r["profile"] == "hf" else 2**20
        assert abs(replayed - m["after_load_allocated_bytes"]) <= slack, (r["id"], replayed)


# Profiles whose records must span the sizes below; the records of the others (hf-prepare) replay within 5% as well.
SPANNED_PROFILES = ("qtool", "hf")


# The records the reserved and NVML models were not shaped on (data/memory/README.md, "Reserved and NVML"): two
# whole models and the largest shape. Nothing in the reserved model is fitted (the allocator replay follows the
# code); the NVML constants (CUDA_CONTEXT_BYTES, PAGED_OVERHEAD_BYTES) were read off the other records only.
HELD_OUT = ("llama-3-8b", "mistral-7b", "llama-1-65b-s1024")
RESERVED_NVML_BOUND = 0.05
# The one record outside the bound, and its bound: qtool's all-linear checkpointed runs are all replayed short (-3% to
# -8%), the longest most; an allocator snapshot of that run would show the allocation the trace lacks
KNOWN_MISSES = {"qtool-llama-3-8b-s8192-b1-r8-all-linear-gc": 0.08}


def _held_out(record: dict) -> bool:
    return any(name in record["id"] for name in HELD_OUT)


def test_replays_recorded_measurements():
    """Every recorded peak allocated is planned within 5%, peak reserved and NVML-used within RESERVED_NVML_BOUND
    (KNOWN_MISSES: their own bound). Needs >= 12 records per profile of SPANNED_PROFILES spanning 0.1B-65B shapes,
    seq 512-8192, rank 8-64, qkvo and all-linear, GC on and off. A record of an out-of-memory run must be planned
    not to fit its GPU.
    Measured peaks are compared as a fresh process would see them: less what earlier runs in the bench's process
    left allocated (carried_allocated_bytes) or reserved (carried_reserved_bytes: the allocator replay of the process
    less that of a fresh one) and, for NVML, the paged optimizer state they leaked (and with it the paged memory's
    extra, PAGED_OVERHEAD_BYTES, in a run without paged state of its own). Records are planned as the bench ran them
    (plan_for_record: the trainer of their date, random weights)."""
    records = _records()
    measured_ok = [r for r in records if not r.get("error")]
    rows, bad, missed = [], [], []
    for r, earlier in zip(records, _earlier_runs(records)):
        p, m = plan_for_record(r), r["measured"]
        if r.get("error"):
            gpu = r.get("gpu", "").removeprefix("NVIDIA ")
            if gpu in GPUS and fits(p, GPUS[gpu] * 2**20):
                bad.append(f"{r['id']} (OOM, planned to fit)")
            rows.append((r["id"], r["profile"], "", "OOM", f"{p.peak_nvml_bytes / 2**30:.2f}", "", "", "",
                         p.peak_phase))
            continue
        carried, carried_reserved = carried_allocated_bytes(r, p), carried_reserved_bytes(r, p, earlier)
        leaked = m.get("paged_bytes_leaked_by_earlier_runs", 0)
        paged_extra = items.PAGED_OVERHEAD_BYTES if leaked and not m.get("paged_state_bytes") else 0
        nvml = m["nvml_used_bytes"] - leaked - paged_extra - carried_reserved
        allocated = m["peak_allocated_bytes"] - carried
        err = [(getattr(p, k) - v) / v for k, v in (("peak_allocated_bytes", allocated),
               ("peak_reserved_bytes", m["peak_reserved_bytes"] - carried_reserved), ("peak_nvml_bytes", nvml))]
        rows.append((r["id"], r["profile"], "held out" if _held_out(r) else "fit", f"{allocated / 2**30:.2f}",
                     f"{p.peak_allocated_bytes / 2**30:.2f}", *(f"{e:+.1%}" for e in err), p.peak_phase))
        if abs(err[0]) > 0.05 or p.n_trainable != r["trainable_params"]:
            bad.append(r["id"])
        if max(abs(err[1]), abs(err[2])) > KNOWN_MISSES.get(r["id"], RESERVED_NVML_BOUND):
            missed.append(f"{r['id']} (reserved {err[1]:+.1%}, NVML {err[2]:+.1%})")
    print("\n" + tabulate(rows, headers=("record", "profile", "set", "measured GiB*", "plan GiB", "alloc err",
                                         "reserved err", "NVML err", "peak phase"), disable_numparse=True)
          + "\n* peak allocated less what earlier runs in the bench's process left (carried_allocated_bytes)")
    assert {r["profile"] for r in records} <= set(PROFILES)
    for profile in SPANNED_PROFILES:
        mine = [r for r in measured_ok if r["profile"] == profile]
        assert len(mine) >= 12, f"{profile}: {len(mine)} records in data/memory/, need >= 12 (data/memory/README.md)"
        n_params = [plan_for_record(r).shape.n_params() for r in mine]
        seqs, ranks = [r["settings"]["seq_len"] for r in mine], [r["settings"]["rank"] for r in mine]
        assert min(n_params) <= 0.2e9 and max(n_params) >= 60e9, f"{profile}: model sizes do not span 0.1B-65B"
        assert min(seqs) <= 512 and max(seqs) >= 8192, f"{profile}: seq lengths do not span 512-8192"
        assert min(ranks) <= 8 and max(ranks) >= 64, f"{profile}: ranks do not span 8-64"
        assert {"qkvo", "all-linear"} <= {r["settings"]["targets"] for r in mine}, f"{profile}: targets"
        assert {True, False} <= {r["settings"]["grad_checkpointing"] for r in mine}, f"{profile}: GC on and off"
        assert any(_held_out(r) for r in mine) and not all(_held_out(r) for r in mine), profile
    assert not bad, f"planned peak allocated off by > 5% (or trainable count differs): {bad}"
    assert not missed, f"planned peak reserved or NVML off by more than the bound: {missed}"


def test_todays_trainer_records_replay_within_5_percent():
    """Records the allocator replay was not built on: the trainer of 2026-12-04 (flat parameter buffer, 64 MiB loss
    chunks, the held-out pass's workspace) and transformers + PEFT in both recipes, measured beside Unsloth on the
    H200 (bench/device/unsloth_h200.sh, bench/results/unsloth_h200_2026-12-04.json). Peak allocated, reserved and
    NVML-used within 5% of each record, later runs of a process planned as the bench ran them."""
    records = [r for r in json.loads((ROOT / "bench/results/unsloth_h200_2026-12-04.json").read_text())
               if r["profile"] in PROFILES and r["profile"] != "unsloth" and not r.get("error")]  # tests/test_plan_unsloth.py
    assert {r["profile"] for r in records} == {"qtool", "hf", "hf-prepare"} and len(records) == 9
    for r, earlier in zip(records, _earlier_runs(records)):
        p = plan_for_record(r)
        p = plan(p.shape, p.settings, process=record_process(r, earlier))
        m = r["measured"]
        for planned, key in ((p.peak_allocated_bytes, "peak_allocated_bytes"),
                             (p.peak_reserved_bytes, "peak_reserved_bytes"), (p.peak_nvml_bytes, "nvml_used_bytes")):
            assert abs(planned - m[key]) / m[key] < 0.05, (r["id"], key, planned, m[key])


def test_records_of_the_trainer_that_captures_on_the_warm_up_stream_replay_within_2_percent():
    """Trainer revision 2026-12-04b (qtool.train.recipe.REVISION): the CUDA graph captured on the warm-up's stream
    (its two cuBLAS workspaces serve the capture) and the held-out pass's workspace given back before training.
    Six H200 rows, each a fresh process, with and without --offload-activations (bench/device/session12.sh,
    bench/results/issue11_rows_h200_2026-12-04b.jsonl), none used to build the replay: allocated, reserved and
    NVML-used within 2% (measured: within 1.3%)."""
    from qtool.plan.process import EVAL_FIRST_TRAINER, TRAINER, Process

    path = ROOT / "bench/results/issue11_rows_h200_2026-12-04b.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    assert len(records) == 6 and {r["trainer"] for r in records} == {TRAINER}
    for r in records:
        p = plan_for_record(r)
        assert record_process(r).trainer == TRAINER
        m = r["measured"]
        for planned, key in ((p.peak_allocated_bytes, "peak_allocated_bytes"),
                             (p.peak_reserved_bytes, "peak_reserved_bytes"), (p.peak_nvml_bytes, "nvml_used_bytes")):
            assert abs(planned - m[key]) / m[key] < 0.02, (r["id"], key, planned, m[key])
        # three of the old revision's five 32 MiB workspaces are gone from the peak
        old = plan(p.shape, p.settings, Process(EVAL_FIRST_TRAINER, random_weights=True))
        assert old.peak_allocated_bytes - p.peak_allocated_bytes == 3 * 32 * 2**20, r["id"]


def test_a_record_of_an_unknown_trainer_revision_is_refused():
    from qtool.plan.records import record_process

    record = json.loads((ROOT / "bench/results/issue11_rows_h200_2026-12-04b.jsonl").read_text().splitlines()[0])
    assert record_process(record).trainer == record["trainer"]
    with pytest.raises(UsageError, match="trainer revision '2099-01-01'"):
        record_process({**record, "trainer": "2099-01-01"})
