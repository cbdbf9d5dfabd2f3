"""NF4 on a CUDA GPU: our torch path on CUDA gives the same bytes as our CPU path (both targets), and
``target="cuda"`` reproduces bitsandbytes' CUDA ``quantize_4bit``. Skipped without a GPU.

bitsandbytes builds its CUDA kernels with --use_fast_math (its reciprocal may be approximate) and takes the
absmax mean on the GPU (another fp32 summation order than our CPU torch.mean), so a value within an ulp of a
midpoint could take the other 8-bit code; the test counts such differences, prints them (run with ``-s``) and, if
``QTOOL_GPU_RECORD`` names a file, writes them there as JSON (data/gpu/ keeps the recorded runs).
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


@pytest.mark.parametrize("target", nf4.TARGETS)
@pytest.mark.parametrize("case", CASES)
def test_cuda_path_equals_cpu_path(case, target):
    w = _case(case)
    for double_quant in (True, False):
        cpu = nf4.quantize(w, double_quant=double_quant, target=target)
        gpu = nf4.quantize(w.cuda(), double_quant=double_quant, target=target)
        assert gpu.packed.is_cuda and gpu.absmax.is_cuda
        assert torch.equal(gpu.packed.cpu(), cpu.packed)
        assert torch.equal(gpu.absmax.cpu().view(torch.uint8), cpu.absmax.view(torch.uint8))
        if double_quant:
            assert torch.equal(gpu.nested_absmax.cpu(), cpu.nested_absmax) and gpu.offset == cpu.offset
        assert torch.equal(nf4.dequantize(gpu).cpu(), nf4.dequantize(cpu))


@pytest.mark.parametrize("case", CASES)
def test_cuda_target_against_bitsandbytes_cuda(case, record):
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
    # Our offset is torch.mean on the CPU whatever the device (deterministic output); bitsandbytes takes the mean on
    # the GPU, whose fp32 sum runs in another order: the last bits may differ, and with them the nested absmax and,
    # for a value near a midpoint, an 8-bit code (by one step).
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


def test_convert_on_cuda_writes_the_same_bytes(tmp_path):
    from conftest import folder_digest, save_tiny
    from qtool.convert.pipeline import convert
    from qtool.convert.verify import REPORT_NAME

    src = save_tiny(tmp_path / "src", "llama")
    for target in nf4.TARGETS:
        convert(src, tmp_path / f"cpu-{target}", target=target)
        convert(src, tmp_path / f"gpu-{target}", target=target, device="cuda")
        a, b = folder_digest(tmp_path / f"cpu-{target}"), folder_digest(tmp_path / f"gpu-{target}")
        a.pop(REPORT_NAME), b.pop(REPORT_NAME)
        assert a == b, target
