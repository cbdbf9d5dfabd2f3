"""GPU checks of the trainer's kernels (skipped on the CPU; run through the device tool, output in data/gpu/)."""
import pytest
import torch

from qtool.nf4 import gpu as kernels

from qtool.nf4 import codec as nf4

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI is CPU-only)")]


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (3, 5), (1, 1), (100, 37)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_dequant_is_bit_identical(shape, double_quant, dtype):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(dtype)
    qw = nf4.quantize(w, double_quant=double_quant)  # on the CPU
    expected = nf4.dequantize(qw)  # the CPU reference, itself bit-identical to bitsandbytes
    got = kernels.dequantize_into(qw.to("cuda"), dtype)
    assert got.dtype == dtype and tuple(got.shape) == shape
    assert torch.equal(got.cpu(), expected)


def test_triton_dequant_matches_bitsandbytes_cuda():
    import bitsandbytes.functional as F

    torch.manual_seed(1)
    w = (torch.randn(2048, 5632) * 0.02).bfloat16().cuda()
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    qw = nf4.QuantizedWeight(packed, state.absmax, state.state2.absmax, float(state.offset), tuple(w.shape),
                             w.dtype, 64)
    assert torch.equal(kernels.dequantize_into(qw, torch.bfloat16), F.dequantize_4bit(packed, state))


def test_trainer_on_cuda_learns_and_starts_at_the_base_model():
    from qtool.train.data import Blocks
    from qtool.adapters.spec import AdapterSpec
    from qtool.train.load import random_decoder
    from qtool.train.settings import decoder_shape
    from qtool.train.recipe import TrainSettings, train

    cfg = decoder_shape({"model_type": "llama", "hidden_size": 256, "intermediate_size": 704,
                                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "vocab_size": 512, "tie_word_embeddings": False})
    model = random_decoder(cfg, "cuda", spec=AdapterSpec(rank=8))
    base = random_decoder(cfg, "cuda")
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))  # B = 0: step 0 is the base model exactly
    pattern = torch.arange(64).repeat(40, 1) % 17  # a learnable sequence
    blocks = Blocks(pattern[:36], pattern[36:], 0)
    res = train(model, blocks, TrainSettings(steps=30, seq_len=64, batch_size=4, lr=3e-3, measure_after=2),
                device=torch.device("cuda"))
    assert res.losses[-1] < 0.7 * res.losses[0]
    assert res.peaks["peak_allocated_bytes"] > 0 and res.optimizer == "paged_adamw_32bit"


def test_cuda_graph_replay_trains_like_eager():
    from qtool.train.data import Blocks
    from qtool.adapters.spec import AdapterSpec
    from qtool.train.load import random_decoder
    from qtool.train.settings import decoder_shape
    from qtool.train.recipe import TrainSettings, train

    cfg = decoder_shape({"model_type": "llama", "hidden_size": 256, "intermediate_size": 704,
                                   "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "vocab_size": 512})
    pattern = torch.arange(64).repeat(40, 1) % 13
    blocks = Blocks(pattern[:36], pattern[36:], 0)
    runs = {}
    for graphs in (False, True):
        model = random_decoder(cfg, "cuda", spec=AdapterSpec(rank=8))
        runs[graphs] = train(model, blocks, TrainSettings(steps=8, seq_len=64, batch_size=2, grad_accum=2, lr=3e-3,
                                                          measure_after=2, cuda_graphs=graphs),
                             device=torch.device("cuda"))
    assert runs[True].cuda_graph == "on" and runs[False].cuda_graph == "off"
    assert torch.allclose(torch.tensor(runs[True].losses), torch.tensor(runs[False].losses), rtol=2e-3)


class _LegacyStreamSGD(torch.optim.SGD):
    """SGD whose update is launched on the default (legacy) stream whatever stream is current — as bitsandbytes'
    optimizer kernels are (its 32-bit update takes no stream argument)."""

    def step(self, closure=None):
        with torch.cuda.stream(torch.cuda.default_stream()):
            return super().step(closure)


def test_warm_up_update_waits_for_the_side_stream_backward(monkeypatch):
    """Issue 14's NaN: the warm-up before the graph capture ran backward and the optimizer on a side stream, but
    bitsandbytes updates on the legacy default stream, which a PyTorch side stream does not synchronise with — so the
    update read gradients before the backward wrote them. Here the forward starts with a ~25 ms GPU sleep so that the
    backward is certainly late; the graph run's losses must still equal the eager run's (with the race, step 0's
    update reads unwritten gradients and step 1's loss differs)."""
    from qtool.adapters.spec import AdapterSpec
    from qtool.train import recipe
    from qtool.train.data import Blocks
    from qtool.train.load import random_decoder
    from qtool.train.recipe import TrainSettings, train
    from qtool.train.settings import decoder_shape

    monkeypatch.setattr(recipe, "make_optimizer",
                        lambda params, name, device, lr, wd, *rest: ("legacy-stream sgd",
                                                                 _LegacyStreamSGD(params, lr=lr)))
    cfg = decoder_shape({"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512})
    pattern = torch.arange(64).repeat(40, 1) % 13
    blocks = Blocks(pattern[:36], pattern[36:], 0)
    runs = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        model = random_decoder(cfg, "cuda", spec=AdapterSpec(rank=8))
        model.loss = lambda ids, *a, f=model.loss: (torch.cuda._sleep(50_000_000), f(ids, *a))[1]  # ~25 ms at 2 GHz
        runs[graphs] = train(model, blocks, TrainSettings(steps=4, seq_len=64, batch_size=2, lr=1.0, measure_after=3,
                                                          cuda_graphs=graphs),
                             device=torch.device("cuda"))
    eager, graph = runs[False].losses, runs[True].losses
    assert runs[True].cuda_graph == "on"
    assert abs(eager[1] - eager[0]) > 1e-2 * eager[0], eager  # the update moves the loss: the check below can fail
    assert torch.allclose(torch.tensor(graph), torch.tensor(eager), rtol=1e-3), (graph, eager)
