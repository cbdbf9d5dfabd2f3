"""The adapter layer on its own: the spec (targets, per-module ranks, checks), the initialisations' exact promises,
the symmetric offset and its PEFT export, PiSSA and LoftQ against their definitions. Small tensors, CPU, fast."""
import math

import pytest
import torch

from qtool.adapters.init import loftq_init, pissa_init, symmetric_init, zero_init
from qtool.adapters.lora import LoRALinear
from qtool.adapters.nf4_linear import NF4Linear
from qtool.adapters.spec import AdapterSpec
from qtool.arch import known_shape
from qtool.errors import InputError, UsageError
from qtool.nf4 import codec as nf4

SMOL = known_shape("smollm2-135m")  # hidden 576, kv 192, intermediate 1536, 30 layers


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _nf4_linear(n_out=128, n_in=192, seed=0, bias=False):
    w = (torch.randn(n_out, n_in, generator=_gen(seed)) * 0.02).to(torch.bfloat16)
    b = torch.randn(n_out, generator=_gen(seed + 1)).to(torch.bfloat16) if bias else None
    return NF4Linear(nf4.quantize(w, target="cpu"), b), w


# ------------------------------------------------------------------------------------------------------------ spec
def test_targets_presets_and_per_module_ranks():
    assert AdapterSpec().module_ranks(SMOL) == {"q_proj": 16, "k_proj": 16, "v_proj": 16, "o_proj": 16}
    assert AdapterSpec("mlp", rank=4).module_ranks(SMOL) == {"gate_proj": 4, "up_proj": 4, "down_proj": 4}
    spec = AdapterSpec("all-linear,down_proj=64,q_proj=8", rank=16)
    assert spec.module_ranks(SMOL) == {"q_proj": 8, "k_proj": 16, "v_proj": 16, "o_proj": 16, "gate_proj": 16,
                                       "up_proj": 16, "down_proj": 64}
    # r (d_in + d_out) per adapted Linear and layer
    assert AdapterSpec("q_proj,v_proj", rank=8).n_trainable(SMOL) == 30 * 8 * ((576 + 576) + (576 + 192))


def test_scale_follows_peft():
    spec = AdapterSpec(alpha=32, alpha_pattern=(("v_proj", 8.0),))
    assert spec.scale_of("q_proj", 16) == 2.0 and spec.scale_of("v_proj", 16) == 0.5
    assert AdapterSpec(alpha=32, use_rslora=True).scale_of("q_proj", 16) == 8.0


@pytest.mark.parametrize("targets,needle", [("q_proj,nope", "no module 'nope'"), ("q_prj", "did you mean q_proj"), ("q_proj=0", "positive integer"),
                                            ("q_proj=x", "positive integer")])
def test_bad_targets_name_the_item(targets, needle):
    with pytest.raises(UsageError, match=needle):
        AdapterSpec(targets).module_ranks(SMOL)


def test_problems_are_collected():
    p = AdapterSpec("k_proj=300", init="nope", dropout=1.5).problems()
    assert any("--init 'nope'" in x for x in p) and any("--dropout" in x for x in p)
    p = AdapterSpec("k_proj=300").problems(SMOL)
    assert p == ["rank 300 of k_proj exceeds min(in, out) = min(576, 192) = 192; a LoRA of that rank is not low-rank"]


def test_spec_json_round_trip():
    spec = AdapterSpec("qkvo,v_proj=32", rank=8, alpha=16, alpha_pattern=(("v_proj", 64.0),), init="symmetric",
                       dropout=0.1, use_rslora=True, loftq_iter=5)
    assert AdapterSpec.from_json(spec.to_json()) == spec


# ----------------------------------------------------------------------------------------------- initialisations
def test_zero_init_is_peft_default():
    a, b, offset = zero_init(64, 256, 8, _gen())
    assert offset is None and torch.count_nonzero(b) == 0
    assert a.abs().max() <= 1 / math.sqrt(256) and a.abs().max() > 0.9 / math.sqrt(256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_symmetric_step0_is_the_base_exactly_and_both_factors_learn(dtype):
    base, _ = _nf4_linear(bias=True)
    a, b, offset = symmetric_init(base.out_features, base.in_features, 8, _gen())
    assert torch.count_nonzero(a) and torch.count_nonzero(b)
    lora = LoRALinear(base, a, b, alpha=16, offset=offset)
    x = torch.randn(3, 5, base.in_features, generator=_gen(7)).to(dtype)
    with torch.no_grad():
        assert torch.equal(lora(x), base(x))
    lora(x).float().square().sum().backward()
    assert torch.count_nonzero(lora.lora_a.grad) > 0 and torch.count_nonzero(lora.lora_b.grad) > 0
    assert lora.offset_a.grad is None and not lora.offset_a.requires_grad
    assert torch.count_nonzero(lora.delta_weight()) == 0


def test_zero_init_gives_no_gradient_to_a():
    base, _ = _nf4_linear()
    a, b, _ = zero_init(base.out_features, base.in_features, 8, _gen())
    lora = LoRALinear(base, a, b, alpha=16)
    lora(torch.randn(4, base.in_features, generator=_gen(3))).square().sum().backward()
    assert torch.count_nonzero(lora.lora_a.grad) == 0 and torch.count_nonzero(lora.lora_b.grad) > 0


@pytest.mark.parametrize("rslora", [False, True])
def test_symmetric_export_is_the_same_function_at_rank_2r(rslora):
    base, _ = _nf4_linear()
    a, b, offset = symmetric_init(base.out_features, base.in_features, 4, _gen())
    lora = LoRALinear(base, a, b, alpha=16, use_rslora=rslora, offset=offset)
    with torch.no_grad():  # move away from the init so the update is not zero
        lora.lora_a.add_(torch.randn(lora.lora_a.shape, generator=_gen(1)) * 0.01)
        lora.lora_b.add_(torch.randn(lora.lora_b.shape, generator=_gen(2)) * 0.01)
    a2, b2, rank2, alpha2 = lora.peft_factors()
    assert rank2 == 8 and a2.shape == (8, base.in_features) and b2.shape == (base.out_features, 8)
    scale2 = alpha2 / math.sqrt(rank2) if rslora else alpha2 / rank2
    assert scale2 == pytest.approx(lora.scale)
    torch.testing.assert_close(scale2 * b2 @ a2, lora.delta_weight(), rtol=1e-5, atol=1e-7)


def test_pissa_residual_plus_adapter_is_w_and_takes_the_top_singular_values():
    w = torch.randn(96, 160, generator=_gen()) * 0.02
    a, b, w_res = pissa_init(w, rank=8, scale=2.0)
    torch.testing.assert_close(w_res + 2.0 * b @ a, w, rtol=0, atol=1e-6)
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.svdvals(2.0 * b @ a)[:8], s[:8], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.linalg.svdvals(w_res)[:4], s[8:12], rtol=1e-4, atol=1e-6)


def test_svd_of_a_nan_tensor_names_it():
    w = torch.randn(16, 32)
    w[3, 4] = float("nan")
    with pytest.raises(InputError, match="model.layers.3.mlp.up_proj.weight"):
        pissa_init(w, 4, 1.0, name="model.layers.3.mlp.up_proj.weight")


def _quantizer(dtype=torch.bfloat16):
    def quantize(w_res):
        qw = nf4.quantize(w_res.to(dtype), target="cpu")
        return qw, nf4.dequantize(qw, torch.float32)
    return quantize


def test_loftq_beats_plain_nf4_and_more_iterations_help():
    w = torch.randn(256, 384, generator=_gen()) * 0.02
    w[:, :8] *= 8  # a few large columns: structure a low-rank adapter can take over
    plain = (w - nf4.dequantize(nf4.quantize(w.bfloat16(), target="cpu"), torch.float32)).norm()
    errors = {}
    for t in (1, 5):
        a, b, qw, _ = loftq_init(w, rank=16, scale=0.5, quantize=_quantizer(), n_iter=t)
        errors[t] = (w - nf4.dequantize(qw, torch.float32) - 0.5 * b @ a).norm()
    assert errors[1] < 0.95 * plain
    assert errors[5] <= errors[1]


def test_loftq_one_iteration_keeps_the_qlora_base():
    w = torch.randn(64, 128, generator=_gen()) * 0.02
    _, _, qw, w_res = loftq_init(w, rank=4, scale=2.0, quantize=_quantizer(), n_iter=1)
    plain = nf4.quantize(w.bfloat16(), target="cpu")
    assert torch.equal(qw.packed, plain.packed) and torch.equal(w_res, w)
