"""qtool/train/flat.py: the trainable parameters and gradients in one buffer, updated by one optimizer call."""
import copy

import pytest
import torch

from qtool.adapters.spec import AdapterSpec
from qtool.train.flat import flatten_parameters
from qtool.train.load import random_decoder
from qtool.train.settings import decoder_shape


def _model(targets="q_proj,v_proj,down_proj", rank=4):
    shape = decoder_shape({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 200})
    torch.manual_seed(0)
    return random_decoder(shape, "cpu", spec=AdapterSpec(targets, rank=rank, init="symmetric"),
                          compute_dtype=torch.float32)


def _train(model, flat: bool, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt_params = flatten_parameters(params) if flat else params
    opt = torch.optim.AdamW(opt_params, lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model.loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=not flat)
        losses.append(float(loss.detach()))
    return losses, opt_params


def test_training_on_the_flat_buffer_equals_training_each_tensor():
    """AdamW updates element by element: the same parameters, bit for bit, after three steps; the modules keep their
    Parameter objects, now views of the one buffer."""
    a = _model()
    b = copy.deepcopy(a)
    ids_before = [id(p) for p in b.parameters()]
    losses_a, _ = _train(a, flat=False)
    losses_b, flats = _train(b, flat=True)
    assert losses_a == losses_b
    assert [id(p) for p in b.parameters()] == ids_before
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    (buf,) = flats
    trainable = [p for p in b.parameters() if p.requires_grad]
    assert buf.numel() == sum(p.numel() for p in trainable)
    for p in trainable:
        assert p.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        assert p.grad.untyped_storage().data_ptr() == buf.grad.untyped_storage().data_ptr()


def test_gradients_accumulate_in_place_into_the_flat_gradient():
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    (buf,) = flatten_parameters(params)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(2))
    model.loss(ids).backward()
    once = buf.grad.clone()
    assert once.abs().sum() > 0
    model.loss(ids).backward()  # accumulated into the same views
    assert torch.allclose(buf.grad, 2 * once, rtol=1e-6, atol=1e-9)
    assert all(p.grad.untyped_storage().data_ptr() == buf.grad.untyped_storage().data_ptr() for p in params)


def test_existing_gradients_move_with_their_parameters_and_dtypes_stay_apart():
    x = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    y = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    x.grad = torch.full((2, 3), 0.5)
    flats = flatten_parameters([x, y])
    assert {f.dtype for f in flats} == {torch.float32, torch.float64} and len(flats) == 2
    f32 = next(f for f in flats if f.dtype == torch.float32)
    assert torch.equal(f32, torch.arange(6.0)) and torch.equal(f32.grad, torch.full((6,), 0.5))
    f32.data.add_(1.0)  # an optimizer's in-place update is the parameter's
    assert torch.equal(x.detach(), torch.arange(1.0, 7.0).reshape(2, 3))


@pytest.mark.parametrize("optimizer,paged_rows", [("paged_adamw_32bit", True), ("adamw_32bit", False)])
def test_plan_pages_the_whole_flat_state(optimizer, paged_rows):
    """With one buffer, a paged optimizer pages all of its state (each 7B r16 factor alone, 65,536 elements, is below
    bitsandbytes' 1e5 paging threshold and would stay on the device): records made before keep per-tensor state."""
    from qtool.arch import known_shape
    from qtool.plan.planner import plan
    from qtool.plan.settings import Settings

    shape = known_shape("llama-2-7b")
    flat = plan(shape, Settings(optimizer=optimizer, seq_len=2048))
    each = plan(shape, Settings(optimizer=optimizer, seq_len=2048, flat_params=False))
    rows = {p: {r.name: r.bytes for r in p.rows} for p in (flat, each)}
    state = 2 * 4 * flat.n_trainable
    device_name = f"optimizer state ({optimizer}) on device"
    if paged_rows:
        assert rows[flat]["optimizer state, paged (managed memory)"] == state
        assert rows[flat][device_name] == 0 and rows[each][device_name] == state
        assert each.peak_allocated_bytes - flat.peak_allocated_bytes == state
    else:
        assert rows[flat][device_name] == rows[each][device_name] == state
