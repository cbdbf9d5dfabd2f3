"""``qtool plan --gpus N`` and ``--fit-gpus``: the per-GPU arithmetic of FSDP2 data parallelism. The shard, all-gather
and reduce-scatter sizes are checked against torch's own fully_shard (3 ranks on the CPU, gloo); the rest against the
one-GPU plan they are built from. No multi-GPU measurement exists yet: these check the arithmetic, not the GPU."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import replace

import pytest
from click.testing import CliRunner

from qtool.arch import resolve_model, shape_from_config
from qtool.cli import main
from qtool.errors import UsageError
from qtool.plan import fsdp
from qtool.plan import resident as items
from qtool.plan.planner import Settings, plan
from qtool.plan.fit import GPUS, fits, gpu_counts, largest_fitting
from qtool.units import MiB

# odd sizes, so that FSDP pads: 3 heads of 32, one kv head, vocab 101, intermediate 200
TINY = {"model_type": "llama", "hidden_size": 96, "intermediate_size": 200, "num_hidden_layers": 2,
        "num_attention_heads": 3, "num_key_value_heads": 1, "vocab_size": 101, "max_position_embeddings": 512,
        "tie_word_embeddings": False}
TINY_SETTINGS = Settings(rank=4, targets="all-linear", batch_size=3, seq_len=16, gpus=3)


def rows(p) -> dict[str, int]:
    return {r.name: r.bytes for r in p.rows}


def row(p, prefix: str) -> int:
    found = [r.bytes for r in p.rows if r.name.startswith(prefix)]
    assert len(found) == 1, (prefix, [r.name for r in p.rows])
    return found[0]


# --- the sharding arithmetic against fully_shard ---------------------------------------------------------------

def _fully_shard_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: a model with qtool's tensors for TINY (NF4 bytes from the codec, LoRA factors as LoRALinear holds
    them, bf16 norms, embeddings and head) under fully_shard per layer and on the root, as qtool train shards it;
    rank 0 writes what FSDP2 allocated."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives

    from qtool.nf4.codec import quantize
    from qtool.plan.settings import layer_linears

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    shape, st = shape_from_config(TINY), TINY_SETTINGS
    ranks = st.module_ranks(shape)

    def frozen(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t, requires_grad=False)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora = nn.ParameterList()
            self.frozen = nn.ParameterList()
            for lin in layer_linears(shape):
                qw = quantize(torch.randn(lin.n_out, lin.n_in), st.block_size, st.double_quant, target="cpu")
                self.frozen.extend(frozen(t) for t in (qw.packed, qw.absmax, qw.nested_absmax))
                self.lora.extend([nn.Parameter(torch.randn(ranks[lin.name], lin.n_in)),
                                  nn.Parameter(torch.randn(lin.n_out, ranks[lin.name]))])
            self.frozen.extend(frozen(torch.ones(shape.hidden, dtype=torch.bfloat16))
                               for _ in range(shape.n_norms_per_layer))

        def forward(self, x):
            return x + sum(a.sum() * b.sum() for a, b in zip(self.lora[::2], self.lora[1::2]))

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = frozen(torch.randn(shape.vocab, shape.hidden, dtype=torch.bfloat16))
            self.layers = nn.ModuleList(Layer() for _ in range(shape.n_layers))
            self.norm = frozen(torch.ones(shape.hidden, dtype=torch.bfloat16))
            self.head = frozen(torch.randn(shape.vocab, shape.hidden, dtype=torch.bfloat16))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x.sum()

    mesh = init_device_mesh("cpu", (world,))
    model = Root()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    def measure(module) -> dict:
        group = module._get_fsdp_state()._fsdp_param_group
        handle = module.unshard(async_op=True)
        flat = group._all_gather_result.all_gather_output
        result = {"sharded": sum(p._sharded_param_data.numel() * p._sharded_param_data.element_size()
                                 for p in group.fsdp_params),
                  "all_gather_output": flat.numel() * flat.element_size(),
                  "local_trainable": [p.sharded_param.to_local().numel() for p in group.fsdp_params
                                      if p.sharded_param.requires_grad]}
        handle.wait()
        result["unsharded"] = sum(t.numel() * t.element_size() for p in group.fsdp_params
                                  for t in p.all_gather_outputs)
        module.reshard()
        return result

    measured = {"layer": measure(model.layers[0]), "root": measure(model)}
    allocations = []
    allocate = collectives.DefaultReduceScatter.allocate

    def record(self, size, *, dtype, device):
        allocations.append(int(torch.Size(size).numel()) * torch.empty((), dtype=dtype).element_size())
        return allocate(self, size, dtype=dtype, device=device)

    collectives.DefaultReduceScatter.allocate = record
    model(torch.zeros(2)).backward()
    measured["reduce_scatter"] = allocations  # per layer group: its input, then its output
    if rank == 0:
        with open(out, "w") as f:
            json.dump(measured, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fully_shard_sizes(tmp_path_factory) -> dict:
    torch_mp = pytest.importorskip("torch.multiprocessing")
    out = tmp_path_factory.mktemp("fsdp") / "sizes.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch_mp.spawn(_fully_shard_worker, args=(TINY_SETTINGS.gpus, port, str(out)), nprocs=TINY_SETTINGS.gpus)
    return json.loads(out.read_text())


def test_shard_sizes_are_fully_shards_own(fully_shard_sizes):
    """Rank 0's padded shards, the all-gathered tensors, the flat all-gather output and the reduce-scatter input and
    output of a layer group and of the root group are, byte for byte, what torch's fully_shard allocates."""
    shape, st = shape_from_config(TINY), TINY_SETTINGS.check(shape_from_config(TINY))
    n = st.gpus
    for name, params in (("layer", fsdp.layer_params(shape, st)), ("root", fsdp.root_params(shape, st))):
        got = fully_shard_sizes[name]
        assert got["sharded"] == sum(p.shard_bytes(n) for p in params), name
        assert got["unsharded"] == sum(p.unsharded_bytes(n) for p in params), name
        assert got["all_gather_output"] == n * sum(p.shard_bytes(n) for p in params), name
        assert got["local_trainable"] == [p.shard_numel(n) for p in params if p.trainable], name
    layer = fsdp.layer_params(shape, st)
    assert fully_shard_sizes["reduce_scatter"] == [
        sum(p.unsharded_bytes(n) for p in layer if p.trainable), sum(p.shard_bytes(n) for p in layer if p.trainable)
    ] * shape.n_layers
    # the tiny shape pads: the nested absmax of 1 or 2 blocks, LoRA A of 4 rows, B of 200, the vocabulary of 101
    assert sum(p.unsharded_bytes(n) for p in layer) > sum(p.numel * p.element_bytes for p in layer)


@pytest.mark.parametrize("rows_, n, padded", [(3, 2, 2), (16, 8, 2), (1, 4, 1), (101, 3, 34), (5, 4, 2)])
def test_shard_rows_follow_torch_chunk(rows_, n, padded):
    """ceil(rows / n) rows for every rank (torch.chunk gives rank 0 the most; the others pad to it)."""
    p = fsdp.Param(rows_, rows_ * 7, 4, "lora")
    assert p.shard_numel(n) == padded * 7 and p.unsharded_bytes(n) == n * padded * 7 * 4


# --- the per-GPU plan ---------------------------------------------------------------------------------------------

SHAPES = ["llama-2-7b", "llama-3.1-70b"]


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_sharded_rows_are_one_nth_of_the_one_gpu_rows(name, n):
    """NF4 bytes, embeddings, head and LoRA factors per GPU are 1/N of the one-GPU rows, up to FSDP's padding (at
    most N - 1 rows per tensor) and the allocator's 512-byte rounding per tensor."""
    shape = resolve_model(name)
    st = Settings(targets="all-linear", gpus=n, batch_size=8)
    one, per_gpu = plan(shape, replace(st, gpus=1)), plan(shape, st)
    tensors = shape.n_layers * len(fsdp.layer_params(shape, st)) + 3
    for single, sharded, row_bytes in (
            ("NF4 weights and quantisation constants", "NF4 weights and quantisation constants, 1/", 4),
            ("embeddings", "embeddings", 2 * shape.hidden), ("lm_head", "lm_head", 2 * shape.hidden),
            ("LoRA adapters (", "LoRA adapters (", 4 * max(shape.intermediate, shape.hidden) * 16)):
        whole, part = row(one, single), row(per_gpu, sharded)
        assert part * n >= whole - 512 * tensors, single
        assert part * n - whole <= tensors * n * (row_bytes + 512), single
        assert part * n < 1.01 * whole, single


def test_one_gpu_is_the_one_gpu_plan():
    """--gpus 1 is the plan as it was: no FSDP row, no NCCL row, the CUDA graph's rows (the warm-up stream's two
    cuBLAS workspaces, which the capture reuses)."""
    shape = resolve_model("llama-2-7b")
    for st in (Settings(), Settings(batch_size=4, targets="all-linear", optimizer="adamw_torch"),
               Settings(profile="hf", seq_len=512)):
        p = plan(shape, replace(st, gpus=1))
        assert p == plan(shape, st)
        assert not any(r.name.startswith(("FSDP", "NCCL")) for r in p.rows)
    assert "cuBLAS workspaces (2 x 32 MiB)" in rows(plan(shape, Settings()))


def test_activations_are_the_per_gpu_batch():
    """The activation rows at --gpus 4 --batch-size 8 are the one-GPU rows at batch 2."""
    shape = resolve_model("llama-3.1-70b")
    per_gpu = rows(plan(shape, Settings(seq_len=8192, batch_size=8, gpus=4)))
    one = rows(plan(shape, Settings(seq_len=8192, batch_size=2, flat_params=False)))
    for name in ("checkpointed inputs of 80 layers", "recomputed layer's saved tensors"):
        assert per_gpu[name] == one[name]
    assert per_gpu["checkpointed inputs of 80 layers"] == 80 * 2 * 8192 * 8192 * 2


def test_fsdp_rows_of_the_peak():
    """At the last layer's backward: the root all-gathered (embeddings + head + final norm, padded), one layer's
    parameters all-gathered and the next layer's flat all-gather output; eager cuBLAS workspaces; NCCL in NVML only."""
    shape = resolve_model("llama-3.1-70b")
    st = Settings(seq_len=8192, batch_size=8, gpus=4)
    p = plan(shape, st)
    assert p.peak_phase == "backward of the last decoder layer"
    vocab_rows = -(-shape.vocab // 4) * 4
    assert row(p, "FSDP: the root's") == 2 * items.alloc(vocab_rows * shape.hidden * 2) + items.alloc(2 * shape.hidden)
    layer = fsdp.layer_params(shape, st.check(shape))
    assert row(p, "FSDP: this layer's") == sum(items.alloc(x.unsharded_bytes(4)) for x in layer)
    assert row(p, "FSDP: all-gather output") == items.alloc(4 * sum(x.shard_bytes(4) for x in layer))
    assert 0.99 < row(p, "FSDP: this layer's") / (row(plan(shape, Settings()), "NF4 weights and") / 80) < 1.01
    nccl = next(r for r in p.rows if r.name.startswith("NCCL"))
    assert (nccl.bytes, nccl.counter) == (688 * MiB, "nvml") and fsdp.nccl_bytes(2) == 544 * MiB
    assert row(p, "cuBLAS workspaces") == 2 * items.CUBLAS_WORKSPACE_BYTES
    assert p.peak_allocated_bytes == sum(r.bytes for r in p.rows if r.counter == "allocated")


def test_a_large_vocabulary_peaks_at_the_start_of_the_forward():
    """Llama-3.1-8B (128,256 tokens) at seq 256: the root all-gathered and its flat all-gather output, waiting for
    layer 0's copy-out, outweigh the short sequence's backward."""
    shape = resolve_model("llama-3.1-8b")
    st = Settings(seq_len=256, batch_size=8, gpus=2)
    p = plan(shape, st)
    assert p.peak_phase == "forward: the root's and layer 0's all-gathers"
    root = fsdp.root_params(shape, st.check(shape))
    table_bytes = 2 * shape.vocab * shape.hidden * 2  # embeddings and head, bf16; the vocabulary splits evenly
    assert row(p, "FSDP: the root's embeddings") == fsdp.unsharded_bytes(root, 2) >= table_bytes
    assert row(p, "FSDP: the root's all-gather output") == fsdp.all_gather_output_bytes(root, 2) >= table_bytes
    assert row(p, "FSDP: layer 0's all-gather output") > 0 and row(p, "embedding output") == 4 * 256 * 4096 * 2
    assert not any(r.name.startswith(("checkpointed", "backward transient")) for r in p.rows)


def test_first_layer_holds_the_sharded_gradients_and_a_reduce_scatter_input():
    shape = resolve_model("llama-2-7b")
    st = Settings(seq_len=512, batch_size=4, gpus=2, targets="all-linear", optimizer="adamw_torch")
    p = plan(shape, st)
    checked = st.check(shape)
    layer = fsdp.layer_params(shape, checked)
    from qtool.plan.planner import _phases  # the candidate phases: the peak is another one

    assert plan(shape, st).peak_phase != "backward of the first decoder layer"
    phases = _phases(shape, replace(checked, batch_size=2), fsdp.sharded_grads_bytes(shape, checked),
                     fsdp.local_trainable_numels(shape, checked))
    _, working = phases["backward of the first decoder layer"]
    grads = next(r for r in working if "gradients of layers 1-31" in r.name)
    assert grads.bytes >= fsdp.sharded_grads_bytes(shape, checked) * 31 // 32
    assert grads.bytes < 0.6 * row(plan(shape, replace(st, gpus=1)), "LoRA adapters (")
    assert fsdp.reduce_scatter_input_bytes(layer, 2) == items.alloc(
        sum(x.unsharded_bytes(2) for x in layer if x.trainable))


def test_optimizer_pages_by_the_local_shard():
    """A paged optimizer pages a state buffer of >= 1e5 elements: the MLP's A (16 x 11008) on one GPU, not its
    half on each of two."""
    shape = resolve_model("llama-2-7b")
    st = Settings(targets="all-linear", batch_size=2)
    one, two = plan(shape, replace(st, flat_params=False)), plan(shape, replace(st, gpus=2))
    assert row(one, "optimizer state, paged") > 0
    assert not any(r.name.startswith("optimizer state, paged") for r in two.rows)
    local = fsdp.local_trainable_numels(shape, replace(st, gpus=2).check(shape))
    assert max(local) < items.PAGED_MIN_NUMEL
    assert row(two, "optimizer state (paged_adamw_32bit)") == 2 * items.tensors_alloc(local, 4)


def test_symmetric_init_offsets_stay_whole():
    """The symmetric init's frozen factors are LoRALinear buffers: FSDP does not shard them."""
    shape = resolve_model("llama-2-7b")
    p = plan(shape, Settings(init="symmetric", gpus=2, batch_size=2))
    assert row(p, "LoRA initial factors") == row(plan(shape, Settings(init="symmetric")), "LoRA adapters (")


@pytest.mark.parametrize("name", SHAPES)
def test_per_gpu_peak_falls_with_the_gpu_count(name):
    shape = resolve_model(name)
    peaks = [plan(shape, Settings(seq_len=4096, batch_size=8, gpus=n)) for n in fsdp.GPU_COUNTS]
    for a, b in zip(peaks, peaks[1:]):
        assert b.peak_allocated_bytes < a.peak_allocated_bytes and b.peak_nvml_bytes < a.peak_nvml_bytes
        assert row(b, "NF4 weights and") < row(a, "NF4 weights and")


def test_70b_at_8192_needs_more_than_one_h200():
    """Llama-3.1-70B at seq 8192, global batch 8: about 154 GiB on one GPU; 84 GiB each on two H200s."""
    shape = resolve_model("llama-3.1-70b")
    st = Settings(seq_len=8192, batch_size=8)
    h200 = GPUS["H200"] * MiB
    assert not fits(plan(shape, st), h200)
    assert fits(plan(shape, replace(st, gpus=2)), h200)
    counts = gpu_counts(shape, st)
    smallest = {g["gpu"]: g["smallest_gpus"] for g in counts["table"]}
    assert smallest["H200"] == 2 and smallest["A100-80GB"] == 4 and smallest["RTX 4090"] is None
    assert [c["per_gpu_batch_size"] for c in counts["counts"]] == [8, 4, 2, 1]
    for c in counts["counts"]:
        assert c["peak_nvml_bytes"] == plan(shape, replace(st, gpus=c["gpus"])).peak_nvml_bytes


def test_counts_that_do_not_split_the_batch_are_skipped():
    counts = gpu_counts(resolve_model("llama-2-7b"), Settings(batch_size=2))
    assert [c["per_gpu_batch_size"] for c in counts["counts"]] == [2, 1, None, None]
    assert all([v["fits"] for v in g["fits"]][2:] == [None, None] for g in counts["table"])


def test_a_small_model_needs_more_per_gpu_memory_on_two_gpus():
    """NCCL's buffers and the all-gathered root come with the second GPU: for a small model they outweigh what
    sharding saves, which is why gpu_counts tries every count instead of bisecting."""
    shape = resolve_model("smollm2-135m")
    one, two = (plan(shape, Settings(seq_len=512, batch_size=2, gpus=n)) for n in (1, 2))
    assert two.peak_nvml_bytes > one.peak_nvml_bytes


def test_batch_search_steps_by_the_gpu_count():
    shape = resolve_model("llama-2-13b")
    st = Settings(seq_len=4096, batch_size=4, gpus=4)
    fit = largest_fitting(shape, st, 80 * 2**30, "batch_size")
    assert fit.step == 4 and fit.value % 4 == 0 and fit.value >= 4
    assert fits(plan(shape, replace(st, batch_size=fit.value)), 80 * 2**30)
    assert not fits(plan(shape, replace(st, batch_size=fit.value + 4)), 80 * 2**30)


@pytest.mark.parametrize("overrides,message", [
    ({"gpus": 0}, "--gpus must be at least 1, got 0"),
    ({"gpus": 4, "batch_size": 6}, "--batch-size 6 is the global batch and does not split evenly over --gpus 4"),
    ({"gpus": 2, "batch_size": 2, "profile": "hf"}, "--gpus 2 with --profile hf: the hf profiles plan transformers"),
    ({"gpus": 2, "batch_size": 2, "device": "cpu"}, "--gpus 2 plans FSDP over CUDA GPUs"),
    ({"gpus": 2, "batch_size": 2, "method": "adalora"}, "--method adalora is planned on one GPU only"),
    ({"gpus": 2, "batch_size": 2, "offload_activations": True}, "--offload-activations is off under FSDP"),
    ({"gpus": 2, "batch_size": 2, "targets": "qkvo,lm_head"}, "LoRA on embed_tokens/lm_head (the root FSDP group)"),
])
def test_bad_gpu_settings_are_refused(overrides, message):
    with pytest.raises(UsageError) as err:
        plan(resolve_model("llama-2-7b"), Settings(**overrides))
    assert message in str(err.value)


# --- CLI ----------------------------------------------------------------------------------------------------------

def run(*args: str):
    return CliRunner().invoke(main, ["plan", *args])


def test_cli_gpus_text_and_json():
    result = run("llama-3.1-70b", "--seq-len", "8192", "--batch-size", "8", "--gpus", "4")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "seq 8192 x batch 8 (global: 2 per GPU on 4 GPUs, FSDP2)" in out
    assert "NF4 weights and quantisation constants, 1/4 shard each (dim 0 padded to a multiple of 4)" in out
    assert "peak per GPU (during backward of the last decoder layer)" in out
    assert "max seq-len (batch 8 over 4 GPUs)" in out
    flat = " ".join(out.split())
    assert "the multi-GPU rows are not validated against measurements: no multi-GPU machine has been available" in flat
    assert "NVIDIA/nccl#964" in flat
    data = json.loads(run("llama-3.1-70b", "--seq-len", "8192", "--batch-size", "8", "--gpus", "4", "--json").stdout)
    assert data["data_parallel"] == {"strategy": "FSDP2", "gpus": 4, "global_batch_size": 8, "per_gpu_batch_size": 2,
                                     "rows": "per GPU (rank 0)"}
    assert data["settings"]["gpus"] == 4
    assert data["peak_allocated_bytes"] == sum(r["bytes"] for r in data["rows"] if r["counter"] == "allocated")
    assert "data_parallel" not in json.loads(run("llama-2-7b", "--json").stdout)


def test_cli_gpus_1_prints_what_it_did_before():
    assert run("llama-2-7b", "--gpus", "1").stdout == run("llama-2-7b").stdout


def test_cli_fit_gpus():
    result = run("llama-3.1-70b", "--seq-len", "8192", "--batch-size", "8", "--fit-gpus")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "--fit-gpus: FSDP2 data parallelism; --batch-size 8 is the global batch" in out
    h200 = next(line for line in out.splitlines() if line.startswith("H200 ") and "yes" in line)
    assert h200.split()[2:] == ["no", "yes", "yes", "yes", "2"]
    data = json.loads(run("llama-3.1-70b", "--seq-len", "8192", "--batch-size", "8", "--fit-gpus", "--json").stdout)
    assert {g["gpu"]: g["smallest_gpus"] for g in data["fit_gpus"]["table"]}["H200"] == 2
    assert [c["gpus"] for c in data["fit_gpus"]["counts"]] == [1, 2, 4, 8]
    single = run("llama-2-70b", "--seq-len", "4096", "--fit-gpus").stdout
    assert "--batch-size 1 does not split over 2, 4, 8 GPUs" in single


@pytest.mark.parametrize("args,message", [
    (["--gpus", "0"], "error: --gpus must be at least 1, got 0"),
    (["--gpus", "2", "--batch-size", "3"], "--batch-size 3 is the global batch and does not split evenly"),
    (["--gpus", "2", "--batch-size", "2", "--profile", "hf"], "--gpus 2 with --profile hf:"),
    (["--fit-gpus", "--gpus", "2"], "error: --fit-gpus tries 1, 2, 4 and 8 GPUs itself: drop --gpus"),
    (["--fit-gpus", "--profile", "hf"], "--fit-gpus (FSDP2 over several GPUs) with --profile hf:"),
    (["--gpus", "2", "--batch-size", "2", "--compare-methods"], "--compare-methods plans all four methods"),
    (["--gpus", "x"], "error: invalid value for '--gpus': 'x' is not a valid integer"),
])
def test_cli_gpu_errors(args, message):
    result = run("llama-2-7b", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stdout == ""
