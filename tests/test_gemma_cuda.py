"""GPU checks of the Gemma 2/3 trainer (qtool.train.gemma; skipped on the CPU): tiny random models train under the
CUDA graph with a finite, falling loss, and the graph's replays give the losses of eager steps."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI is CPU-only)")]

# one sliding layer (window 8, shorter than the 32-token blocks: the masked path) and one global layer
CONFIGS = {
    "gemma2": {"model_type": "gemma2", "sliding_window": 8},
    "gemma3_text": {"model_type": "gemma3_text", "sliding_window": 8,
                    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
}


def _shape(arch):
    from qtool.train.settings import decoder_shape

    return decoder_shape({"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2, "head_dim": 64,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                          "layer_types": ["sliding_attention", "full_attention"], **CONFIGS[arch]})


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_graph_trainer_learns_and_replays_like_eager(arch):
    from qtool.adapters.spec import AdapterSpec
    from qtool.train.data import Blocks
    from qtool.train.load import random_decoder
    from qtool.train.recipe import TrainSettings, train

    pattern = torch.arange(32).repeat(40, 1) % 13  # a learnable sequence
    blocks = Blocks(pattern[:36], pattern[36:], 0)
    runs = {}
    for graphs in (False, True):
        model = random_decoder(_shape(arch), "cuda", spec=AdapterSpec("all-linear", rank=8))
        runs[graphs] = train(model, blocks, TrainSettings(steps=12, seq_len=32, batch_size=2, grad_accum=2, lr=3e-3,
                                                          measure_after=2, cuda_graphs=graphs),
                             device=torch.device("cuda"))
    losses = torch.tensor(runs[True].losses)
    print(arch, "graph", runs[True].losses, "eager", runs[False].losses)
    assert runs[True].cuda_graph == "on" and runs[False].cuda_graph == "off"
    assert torch.isfinite(losses).all() and losses[-1] < 0.8 * losses[0]
    assert torch.allclose(losses, torch.tensor(runs[False].losses), rtol=2e-3)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_step0_is_the_base_model_on_cuda(arch):
    from qtool.adapters.spec import AdapterSpec
    from qtool.train.load import random_decoder

    model = random_decoder(_shape(arch), "cuda", spec=AdapterSpec(rank=8))
    base = random_decoder(_shape(arch), "cuda")
    ids = torch.randint(0, 512, (2, 32), device="cuda")
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))  # B = 0
        assert torch.isfinite(model.loss(ids))
