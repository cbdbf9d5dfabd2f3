"""NF4 on a CUDA GPU. Skipped without a GPU; run on one with ``python -m pytest -q -m gpu tests/test_nf4_cuda.py``.

* ``target="cuda"`` on a CUDA tensor (``--device cuda``) reproduces bitsandbytes' CUDA ``quantize_4bit`` byte for
  byte: its fast-math reciprocal (``rcp.approx.ftz``), flush-to-zero and on-device mean (qtool.nf4.gpu_bytes);
  end to end, a conversion with ``--device cuda`` equals transformers' own quantise-on-load on the GPU;
* ``target="cuda"`` on the CPU (the default) differs from it only where that reciprocal or mean differs in the last
  bit: the test counts such differences, prints them (run with ``-s``) and, if ``QTOOL_GPU_RECORD`` names a file,
  writes them there as JSON (data/gpu/ keeps the recorded runs);
* ``target="cpu"`` gives the same bytes on the GPU as on the CPU.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from qtool.nf4 import codec as nf4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False"),
]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _case(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    if name == "randn fp16 4096x4096":
        return torch.randn(4096, 4096, generator=g).half()
    if name == "randn bf16 4096x11008":
        return (torch.randn(4096, 11008, generator=g) * 0.02).bfloat16()
    if name == "randn fp32 1024x1000":
        return torch.randn(1024, 1000, generator=g)
    if name == "odd fp16 3x5":
        return torch.randn(3, 5, generator=g).half()
    if name == "tail bf16 100x37":
        return torch.randn(100, 37, generator=g).bfloat16()
    if name == "zero tail fp16 10x70":
        w = torch.randn(10, 70, generator=g)
        w.view(-1)[640:] = 0
        return w.half()
    if name == "zero rows fp16 256x1024":
        w = torch.randn(256, 1024, generator=g)
        w[64:128] = 0
        return w.half()
    if name == "student-t fp16 2048x2048":
        torch.manual_seed(5)  # distributions sample from the global generator
        return torch.distributions.StudentT(torch.tensor(2.0)).sample((2048, 2048)).clamp(-6e4, 6e4).half()
    raise KeyError(name)


CASES = ["randn fp16 4096x4096", "randn bf16 4096x11008", "randn fp32 1024x1000", "odd fp16 3x5", "tail bf16 100x37",
         "zero tail fp16 10x70", "zero rows fp16 256x1024", "student-t fp16 2048x2048"]


@pytest.fixture(scope="module")
def record():
    rows: list[dict] = []
    yield rows
    if rows:
        print("\n" + "\n".join(json.dumps(r) for r in rows))
        path = os.environ.get("QTOOL_GPU_RECORD")
        if path:
            import datetime

            import bitsandbytes

            with open(path, "w") as f:
                json.dump({"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
                           "torch": torch.__version__, "cuda": torch.version.cuda,
                           "bitsandbytes": bitsandbytes.__version__, "rows": rows}, f, indent=1)


@pytest.mark.parametrize("case", CASES)
def test_cpu_target_on_the_gpu_equals_the_cpu(case):
    w = _case(case)
    for double_quant in (True, False):
        cpu = nf4.quantize(w, double_quant=double_quant, target="cpu")
        gpu = nf4.quantize(w.cuda(), double_quant=double_quant, target="cpu")
        assert gpu.packed.is_cuda and gpu.absmax.is_cuda
        assert torch.equal(gpu.packed.cpu(), cpu.packed)
        assert torch.equal(gpu.absmax.cpu().view(torch.uint8), cpu.absmax.view(torch.uint8))
        if double_quant:
            assert torch.equal(gpu.nested_absmax.cpu(), cpu.nested_absmax) and gpu.offset == cpu.offset
        assert torch.equal(nf4.dequantize(gpu).cpu(), nf4.dequantize(cpu))


def _assert_same_as_bitsandbytes_cuda(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    F = pytest.importorskip("bitsandbytes.functional")
    packed, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    ours = nf4.quantize(w, blocksize, double_quant, target="cuda")
    assert ours.packed.is_cuda and ours.packed.shape == packed.shape
    assert torch.equal(ours.packed, packed), f"{int((ours.packed != packed).sum())} packed bytes differ"
    assert ours.absmax.dtype == qs.absmax.dtype
    assert torch.equal(ours.absmax.view(torch.uint8), qs.absmax.view(torch.uint8)), \
        f"{int((ours.absmax != qs.absmax).sum())} of {qs.absmax.numel()} absmax values differ"
    if double_quant:
        assert torch.equal(ours.nested_absmax.view(torch.int32), qs.state2.absmax.view(torch.int32))
        assert ours.offset == float(qs.offset.item())
    assert torch.equal(nf4.dequantize(ours).view(-1).view(torch.uint8),
                       F.dequantize_4bit(packed, qs).reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("case", CASES)
def test_cuda_target_on_the_gpu_is_bitsandbytes_cuda_byte_for_byte(case):
    _assert_same_as_bitsandbytes_cuda(_case(case).cuda())


@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_cuda_target_on_the_gpu_other_block_sizes(blocksize, double_quant):
    w = (torch.randn(77, 1000, generator=torch.Generator().manual_seed(blocksize)) * 0.02).bfloat16()
    w[5:9] = 0  # all-zero blocks: NaN scale on CUDA, code 0
    _assert_same_as_bitsandbytes_cuda(w.cuda(), blocksize, double_quant)


def test_cuda_target_on_the_gpu_many_layers():
    """The weights of a random 1.7B Llama (the shapes of issue 13, 24 layers x 7 projections drawn at random scale):
    every one byte for byte, where the CPU path differed in the absmax codes of 7 and the offset of 44 of 168."""
    import random

    rng, g = random.Random(13), torch.Generator(device="cuda").manual_seed(13)
    shapes = [(2048, 2048), (2048, 2048), (2048, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)]
    for layer in range(24):
        for shape in shapes:
            w = torch.randn(shape, generator=g, device="cuda") * rng.uniform(0.005, 0.05)
            _assert_same_as_bitsandbytes_cuda(w.bfloat16())


def test_subnormal_weights_are_flushed_as_on_the_gpu():
    """bf16 can hold fp32-subnormal values; bitsandbytes' fast-math kernels flush them to zero (ftz)."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3)) * 0.02
    w[:4] = torch.randn(4, 64, generator=torch.Generator().manual_seed(4)) * 1e-39  # 4 blocks of subnormals only
    w[4, :8] = 1e-39  # subnormals beside normal values
    _assert_same_as_bitsandbytes_cuda(w.bfloat16().cuda())
    _assert_same_as_bitsandbytes_cuda(w.cuda())


@pytest.mark.parametrize("case", CASES)
def test_cuda_target_on_the_cpu_against_bitsandbytes_cuda(case, record):
    F = pytest.importorskip("bitsandbytes.functional")
    w = _case(case)
    packed, qs = F.quantize_4bit(w.cuda(), blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = nf4.quantize(w, target="cuda")
    theirs_packed, theirs_codes = packed.cpu().view(-1), qs.absmax.cpu()
    n_packed = int((ours.packed.view(-1) != theirs_packed).sum())
    step = (ours.absmax.int() - theirs_codes.int()).abs()
    n_codes, max_step = int((step > 0).sum()), int(step.max())
    bnb_offset = float(qs.offset.item())
    row = {"case": case, "packed_bytes_differ": n_packed, "packed_bytes": theirs_packed.numel(),
           "absmax_codes_differ": n_codes, "absmax_codes": step.numel(), "max_code_step": max_step,
           "offset_ours": ours.offset, "offset_bnb": bnb_offset,
           "nested_absmax_differ": int((ours.nested_absmax != qs.state2.absmax.cpu()).sum())}
    record.append(row)
    assert n_packed == 0, row
    # On the CPU the offset is torch.mean on the CPU and the reciprocal IEEE (deterministic output); bitsandbytes
    # takes the mean on the GPU, whose fp32 sum runs in another order, and a fast-math reciprocal: the last bits may
    # differ, and with them the nested absmax and, for a value near a midpoint, an 8-bit code (by one step).
    assert ours.offset == pytest.approx(bnb_offset, rel=1e-6, abs=1e-12), row
    assert torch.allclose(ours.nested_absmax, qs.state2.absmax.cpu(), rtol=1e-5, atol=0), row
    assert max_step <= 1 and n_codes <= max(1, step.numel() // 1000), row


@pytest.mark.parametrize("case", ["randn bf16 4096x11008", "tail bf16 100x37", "zero rows fp16 256x1024"])
def test_dequantize_on_cuda_matches_bitsandbytes(case):
    F = pytest.importorskip("bitsandbytes.functional")
    w = _case(case).cuda()
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    qw = nf4.QuantizedWeight(packed, qs.absmax, qs.state2.absmax, float(qs.offset.item()), tuple(w.shape), w.dtype)
    assert torch.equal(nf4.dequantize(qw), F.dequantize_4bit(packed, qs))


def test_convert_on_cuda_writes_the_same_bytes_as_transformers_on_the_gpu(tmp_path):
    """End to end: `qtool convert --device cuda` (default target cuda) writes, tensor for tensor and byte for byte,
    what transformers + bitsandbytes save after quantising on load on this GPU; --target cpu on the GPU writes the
    CPU conversion's bytes."""
    from conftest import folder_digest, save_tiny
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qtool.convert.pipeline import convert
    from qtool.convert.verify import REPORT_NAME

    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=4, head_dim=64, vocab_size=256, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)  # 45 k blocks per MLP weight, 4 layers: 28 weights
    src = tmp_path / "src"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(src)
    convert(src, tmp_path / "gpu", device="cuda")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb, device_map="cuda", dtype=torch.bfloat16)
    ref.save_pretrained(tmp_path / "ref")
    ours = {k: v for p in sorted((tmp_path / "gpu").glob("*.safetensors")) for k, v in load_file(p).items()}
    theirs = {k: v for p in sorted((tmp_path / "ref").glob("*.safetensors")) for k, v in load_file(p).items()}
    assert set(ours) == set(theirs)
    differ = [k for k in ours if not torch.equal(ours[k].reshape(-1).view(torch.uint8),
                                                 theirs[k].reshape(-1).view(torch.uint8))]
    assert differ == []

    small = save_tiny(tmp_path / "small", "llama")
    convert(small, tmp_path / "cpu-cpu", target="cpu")
    convert(small, tmp_path / "gpu-cpu", target="cpu", device="cuda")
    a, b = folder_digest(tmp_path / "cpu-cpu"), folder_digest(tmp_path / "gpu-cpu")
    a.pop(REPORT_NAME), b.pop(REPORT_NAME)
    assert a == b
