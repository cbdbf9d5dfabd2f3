"""NF4 core: the code tables, nibble packing, and bit-identity with bitsandbytes 0.50.2.

Oracles: bitsandbytes' own CPU ``quantize_4bit`` / ``dequantize_4bit`` for ``target="cpu"``; an exact-nearest
quantiser written here in plain numpy for ``target="cuda"`` (bitsandbytes' CUDA kernels cannot run on the CPU).
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from qtool.nf4 import codec as nf4
from qtool.errors import InputError

bnbF = pytest.importorskip("bitsandbytes.functional")
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402

# bitsandbytes' reference dequantisation (its "default" backend: what CUDA computes and what its CPU backend falls
# back to), without the torch.compile wrapper that recompiles for every new shape.
_bnb_reference_dequantize = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------ test cases
def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(shape, generator=_gen(seed)) * scale


def _zero_rows():
    w = _randn(64, 128, seed=1)
    w[3:6] = 0  # 6 all-zero blocks
    return w


def _zero_tail():
    w = _randn(10, 70, seed=2)  # 700 = 10 * 64 + 60
    w.view(-1)[640:] = 0
    return w


def _zero_everything():
    return torch.zeros(5, 13)  # one full all-zero block and an all-zero tail


def _heavy_tails():
    t = torch.distributions.StudentT(torch.tensor(1.5))
    torch.manual_seed(3)
    return t.sample((96, 200)).clamp(-6e4, 6e4)  # fp16 range


def _outlier_columns():
    w = _randn(128, 192, seed=4, scale=0.02)
    w[:, [5, 77, 150]] *= 300
    return w


def _equal_absmax():
    # every block's absmax is 0.5, so absmax - offset is 0 everywhere: each nested block is all zero
    w = _randn(64, 256, seed=5).clamp(-0.4, 0.4)
    w[:, ::64] = 0.5
    return w


CASES = {
    "randn 128x256": lambda: _randn(128, 256),
    "numel%64 100x37": lambda: _randn(100, 37, seed=6),
    "odd 3x5": lambda: _randn(3, 5, seed=7),
    "1x1": lambda: _randn(1, 1, seed=8),
    "1x1 zero": lambda: torch.zeros(1, 1),
    "odd 7x9": lambda: _randn(7, 9, seed=9),
    "blocks%256 257x64": lambda: _randn(257, 64, seed=10),
    "blocks 600x96 (rows span blocks)": lambda: _randn(600, 96, seed=11),
    "3-D 4x6x50": lambda: _randn(4, 6, 50, seed=12),
    "zero blocks": _zero_rows,
    "zero tail": _zero_tail,
    "all zero": _zero_everything,
    "heavy tails": _heavy_tails,
    "outlier columns": _outlier_columns,
    "equal absmax": _equal_absmax,
    "tiny (fp16 subnormals)": lambda: _randn(64, 64, seed=13, scale=3e-6),
    "large": lambda: _randn(64, 64, seed=14, scale=1.5e4).clamp(-6e4, 6e4),  # near the fp16 maximum
}


def bnb_quantize(w, blocksize=64, double_quant=True):
    return bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def _bnb_nf4_code() -> torch.Tensor:
    return bnbF.get_4bit_type("nf4", device="cpu")


def assert_same_as_bnb(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    packed, qs = bnb_quantize(w, blocksize, double_quant)
    qw = nf4.quantize(w, blocksize, double_quant, target="cpu")
    assert qw.packed.dtype == torch.uint8 and qw.packed.shape == packed.shape
    assert torch.equal(qw.packed, packed), f"packed: {(qw.packed != packed).sum().item()} bytes differ"
    assert qw.absmax.dtype == qs.absmax.dtype
    assert torch.equal(qw.absmax, qs.absmax), f"absmax: {(qw.absmax != qs.absmax).sum().item()} differ"
    if double_quant:
        assert torch.equal(qw.nested_absmax, qs.state2.absmax)
        assert np.float32(qw.offset) == qs.offset.numpy()  # same fp32 value
        assert torch.equal(nf4.absmax_fp32(qw), bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset)
    else:
        assert qw.nested_absmax is None and qw.offset is None
    assert qw.shape == tuple(qs.shape) and qw.dtype == qs.dtype == w.dtype and qw.blocksize == qs.blocksize
    # dequantisation, bit for bit (compare bits, so that -0.0 vs 0.0 would show)
    ours = nf4.dequantize(qw)
    absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if double_quant else qs.absmax
    reference = _bnb_reference_dequantize(packed.reshape(-1), absmax, _bnb_nf4_code(), blocksize, qs.shape, w.dtype)
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    assert torch.equal(ours.view(-1).view(torch.uint8), reference.reshape(-1).view(torch.uint8))
    if w.shape[-1] % blocksize == 0 or w.shape[-1] % 2:
        # bitsandbytes' public dequantize_4bit (its C++ CPU kernel) agrees except when blocks span rows, see below
        theirs = bnbF.dequantize_4bit(packed, qs)
        assert torch.equal(ours.view(-1).view(torch.uint8), theirs.reshape(-1).view(torch.uint8))
    return qw


# -------------------------------------------------------------------------------------------------- code tables
def test_code_regenerated_from_normal_quantiles():
    """bitsandbytes `create_normal_map(offset=0.9677083, use_extra_value=True)`, rebuilt from the normal quantile
    function: 8 positive quantiles of linspace(offset, 0.5, 9)[:-1] (fp32 probabilities), 7 negative ones of
    linspace(offset, 0.5, 8)[:-1], and 0; normalised by the largest in fp32."""
    ppf = NormalDist().inv_cdf
    probs = lambda k: torch.linspace(nf4.NF4_OFFSET, 0.5, k, dtype=torch.float32)[:-1].tolist()  # noqa: E731
    values = [ppf(p) for p in probs(9)] + [0.0] + [-ppf(p) for p in probs(8)]
    v = torch.tensor(sorted(values), dtype=torch.float32)
    v = v / v.max()
    assert torch.equal(v, torch.tensor(nf4.NF4_CODE, dtype=torch.float32))
    assert len(nf4.NF4_CODE) == 16 and nf4.NF4_CODE[7] == 0.0 and nf4.NF4_CODE[0] == -1.0


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(torch.tensor(nf4.NF4_CODE, dtype=torch.float32), bnbF.get_4bit_type("nf4", device="cpu"))
    assert np.array_equal(nf4.dynamic_map_signed(), bnbF.create_dynamic_map(signed=True).numpy())
    th = nf4.nf4_thresholds()
    assert th.dtype == np.float32 and th.size == 15 and np.all(np.diff(th) > 0)
    # the fp32 bit patterns of the thresholds (bitsandbytes' CUDA literals round to exactly these)
    assert th.view(np.uint32)[[0, 7, 14]].tolist() == [0xBF591CD8, 0x3D22FAFF, 0x3F5C89DA]


# ------------------------------------------------------------------------------------------------------ packing
def test_pack_golden_bytes():
    codes = torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8)
    assert nf4.pack_nibbles(codes).tolist() == [0x12, 0x34, 0x50]  # first element in the high nibble
    assert nf4.unpack_nibbles(torch.tensor([0x12, 0x34, 0x50], dtype=torch.uint8), 5).tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("n", [1, 2, 3, 15, 16, 63, 64, 65, 127, 1000, 4097])
def test_pack_unpack_round_trip(n):
    codes = torch.randint(0, 16, (n,), generator=_gen(n), dtype=torch.uint8)
    packed = nf4.pack_nibbles(codes)
    assert packed.numel() == (n + 1) // 2
    assert torch.equal(nf4.unpack_nibbles(packed, n), codes)
    assert torch.equal(nf4.pack_nibbles(nf4.unpack_nibbles(packed, n)), packed)  # odd n: the pad nibble is 0 both ways


def test_quantized_bytes_follow_pack_layout():
    w = _randn(3, 7, seed=20)
    qw = nf4.quantize(w, target="cpu")
    codes = nf4.unpack_nibbles(qw.packed, w.numel())
    assert torch.equal(nf4.pack_nibbles(codes)[:-1], qw.packed.view(-1)[:-1])
    assert qw.packed.view(-1)[-1] & 0xF == 7  # odd numel: padded with the code of 0.0, as bitsandbytes does


# ------------------------------------------------------------------------------------- bit-identity (CPU oracle)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", list(CASES))
def test_bit_identical_to_bitsandbytes_cpu(case, dtype):
    w = CASES[case]().to(dtype)
    assert torch.isfinite(w).all()
    assert_same_as_bnb(w)


@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_bit_identical_other_blocksizes(blocksize, double_quant):
    w = _randn(77, 1000, seed=blocksize).to(torch.bfloat16)  # 77,000 elements: a partial last block for every size
    w[5:9] = 0
    qw = assert_same_as_bnb(w, blocksize, double_quant)
    assert qw.absmax.dtype == (torch.uint8 if double_quant else torch.float32)


def test_large_tensor_many_nested_blocks():
    w = _randn(1024, 4160, seed=21, scale=0.02).to(torch.float16)  # 66,560 blocks: 260 nested blocks, last partial
    assert_same_as_bnb(w)


def _near_threshold_blocks(n_blocks: int, seed: int) -> torch.Tensor:
    """fp32 blocks whose elements sit exactly on, and 1-2 ulp either side of, ``threshold * absmax``: the values for
    which multiplying by the fp32 reciprocal and dividing give different codes."""
    rng = np.random.default_rng(seed)
    th = nf4.nf4_thresholds()
    a = rng.uniform(0.3, 3.0, n_blocks).astype(np.float32)
    k = rng.integers(0, 15, (n_blocks, 63))
    base = (th[k] * a[:, None]).astype(np.float32)
    step = rng.integers(-2, 3, (n_blocks, 63))
    x = base
    for _ in range(2):
        x = np.where(step > 0, np.nextafter(x, np.float32(np.inf)), np.where(step < 0, np.nextafter(x, -np.inf), x))
        step = step - np.sign(step)
    blocks = np.concatenate([a[:, None], x.astype(np.float32)], axis=1)  # element 0 fixes the absmax
    return torch.from_numpy(blocks.reshape(-1).copy())


def test_near_threshold_fp32_matches_bitsandbytes():
    w = _near_threshold_blocks(4096, seed=22).view(512, 512)
    qw = assert_same_as_bnb(w)
    # the test has teeth: dividing instead of multiplying by the reciprocal changes codes on this input
    x = w.view(-1, 64)
    div = np.searchsorted(nf4.nf4_thresholds(), (x / x.abs().amax(1, keepdim=True)).numpy().reshape(-1), side="left")
    ours = nf4.unpack_nibbles(qw.packed, w.numel()).numpy()
    assert (div != ours).sum() > 100


def test_ties_take_the_lower_code():
    """A scaled value exactly on the midpoint of two codes gets the lower one; one ulp above gets the upper."""
    th = nf4.nf4_thresholds()
    up, down = np.nextafter(th, np.float32(2)), np.nextafter(th, np.float32(-2))
    on = np.concatenate([[1.0], th, up, down]).astype(np.float32)
    on = np.concatenate([on, np.zeros(64 - on.size % 64, np.float32)])
    w = torch.from_numpy(on)
    for target in nf4.TARGETS:
        codes = nf4.unpack_nibbles(nf4.quantize(w, double_quant=False, target=target).packed, w.numel()).numpy()
        k = np.arange(15)
        assert codes[0] == 15
        assert np.array_equal(codes[1:16], k), target  # exactly on threshold k: code k (the lower)
        assert np.array_equal(codes[16:31], k + 1), target  # one ulp above: code k + 1
        assert np.array_equal(codes[31:46], k), target
    assert_same_as_bnb(w)


# ------------------------------------------------------------------------------- target="cuda" vs a numpy oracle
def _oracle_cuda(w: torch.Tensor, blocksize: int = 64):
    """bitsandbytes' CUDA kernels as arithmetic, in plain numpy: every block (the last partial one too, zero-padded)
    scaled by the fp32 reciprocal of its absmax, the NF4 code = number of fp32 midpoints strictly below (an all-zero
    block gives 0 * inf = NaN, below nothing: code 0); the absmax minus its torch.mean quantised to the EXACT
    nearest value of the signed dynamic map (fp64 distances), 256 per block; an all-zero nested block gives code 0."""
    x = w.detach().float().reshape(-1).numpy()
    n = x.size
    n_blocks = -(-n // blocksize)
    xp = np.zeros(n_blocks * blocksize, np.float32)
    xp[:n] = x
    blocks = xp.reshape(n_blocks, blocksize)
    absmax = np.abs(blocks).max(1).astype(np.float32)
    code = np.array(bnbF.get_4bit_type("nf4", device="cpu").tolist(), np.float32)
    mid = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = blocks * (np.float32(1) / absmax)[:, None]
        q = (scaled[..., None] > mid).sum(-1).astype(np.uint8).reshape(-1)[: n + n % 2]
    packed = (q[0::2] << 4) | q[1::2]
    offset = torch.from_numpy(absmax).mean().numpy()  # the definition: torch.mean of the fp32 absmax
    y = (absmax - offset).astype(np.float32)
    dyn = bnbF.create_dynamic_map(signed=True).numpy().astype(np.float64)
    n_nested = -(-y.size // 256)
    yp = np.zeros(n_nested * 256, np.float32)
    yp[: y.size] = y
    nested = np.abs(yp.reshape(-1, 256)).max(1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (yp.reshape(-1, 256) * (np.float32(1) / nested)[:, None]).astype(np.float32).reshape(-1)[: y.size]
    codes8 = np.abs(s.astype(np.float64)[:, None] - dyn[None, :]).argmin(1).astype(np.uint8)
    codes8[np.isnan(s)] = 0
    return packed, absmax, codes8, nested, float(offset), s


def _check_against_cuda_oracle(w: torch.Tensor) -> nf4.QuantizedWeight:
    packed, absmax, codes8, nested, offset, s = _oracle_cuda(w)
    qw = nf4.quantize(w, target="cuda")
    assert np.array_equal(qw.packed.numpy().reshape(-1), packed)
    assert np.array_equal(nf4.quantize(w, double_quant=False, target="cuda").absmax.numpy(), absmax)
    assert np.array_equal(qw.nested_absmax.numpy(), nested) and qw.offset == offset
    ours = qw.absmax.numpy()
    differ = np.nonzero(ours != codes8)[0]
    # CUDA compares with fp32 midpoints; exact nearest may disagree only within an ulp or two of a midpoint
    dyn = bnbF.create_dynamic_map(signed=True).numpy()
    for i in differ:
        lo, hi = sorted((dyn[ours[i]], dyn[codes8[i]]))
        assert abs(int(ours[i]) - int(codes8[i])) == 1
        assert abs(s[i] - (lo + hi) / 2) <= 2 * np.spacing(np.float32((lo + hi) / 2)), (i, s[i], lo, hi)
    assert differ.size <= max(1, ours.size // 10_000)
    return qw


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", ["randn 128x256", "numel%64 100x37", "odd 3x5", "1x1", "1x1 zero", "zero blocks",
                                  "zero tail", "all zero", "heavy tails", "outlier columns", "equal absmax",
                                  "blocks%256 257x64"])
def test_cuda_target_matches_exact_nearest_oracle(case, dtype):
    _check_against_cuda_oracle(CASES[case]().to(dtype))


def test_nested_codes_equal_bitsandbytes_binary_search():
    """target="cuda"'s 8-bit codes are found through the look-up table and exact midpoint comparisons; they must be
    what bitsandbytes' dQuantize<0> binary search returns (written out literally in qtool.nf4.gpu_bytes), for
    random values, every code value and midpoint, and their fp32 neighbours."""
    from qtool.nf4 import _cpu, gpu_bytes

    code = nf4.dynamic_map_signed()
    mid = ((code[1:] + code[:-1]) * np.float32(0.5)).astype(np.float32)
    rng = np.random.default_rng(0)
    points = np.concatenate([code, mid])
    x = np.concatenate([rng.uniform(-1, 1, 100_000), rng.standard_normal(20_000) * 1e-3, points,
                        np.nextafter(points, np.float32(2)), np.nextafter(points, np.float32(-2)),
                        [0.0, -0.0, 1.0, -1.0]]).astype(np.float32).clip(-1, 1)
    # blocks of 256 led by 1.0: each block's absmax is 1, its reciprocal 1, so the kernel searches x itself
    x = np.concatenate([x, np.zeros(-x.size % 255, np.float32)]).reshape(-1, 255)
    y = np.concatenate([np.ones((x.shape[0], 1), np.float32), x], axis=1).reshape(-1)
    codes, nested = np.empty(y.size, np.uint8), np.empty(x.shape[0], np.float32)
    _cpu.nested_codes_search(y, 256, code, nf4._nested_lut(code), codes, nested)
    assert np.all(nested == 1.0)
    expected = gpu_bytes.dquantize_search(torch.from_numpy(y), torch.from_numpy(code)).numpy()
    assert np.array_equal(codes, expected), int((codes != expected).sum())


def test_cuda_target_large_against_oracle():
    _check_against_cuda_oracle(_randn(2048, 2048, seed=23, scale=0.02).to(torch.bfloat16))


def test_where_cuda_and_cpu_targets_differ(capsys):
    """The two targets differ in the 8-bit absmax codes (LUT vs exact nearest: a fraction of a percent, one step at
    most), in all-zero blocks (4-bit code 7 vs 0) and in an all-zero tail block's absmax; nowhere else."""
    w = _randn(4096, 1024, seed=24, scale=0.02).to(torch.float16)
    cpu, cuda = nf4.quantize(w, target="cpu"), nf4.quantize(w, target="cuda")
    assert torch.equal(cpu.packed, cuda.packed) and torch.equal(cpu.nested_absmax, cuda.nested_absmax)
    assert cpu.offset == cuda.offset
    d = (cpu.absmax.int() - cuda.absmax.int()).abs()
    n_diff = int((d > 0).sum())
    assert 0 < n_diff < 0.01 * d.numel() and int(d.max()) == 1
    # the dequantised absmax moves by one step of the 8-bit code at most
    a_cpu, a_cuda = nf4.absmax_fp32(cpu), nf4.absmax_fp32(cuda)
    assert float((a_cpu - a_cuda).abs().max()) < 0.02 * float(cpu.nested_absmax.max())

    z = _zero_everything()  # 65 elements: one zero full block, one zero tail element
    zc, zg = nf4.quantize(z, target="cpu"), nf4.quantize(z, target="cuda")
    assert set(zc.packed.view(-1).tolist()) == {0x77} and set(zg.packed.view(-1).tolist()) == {0x00}
    assert nf4.quantize(z, double_quant=False, target="cpu").absmax.tolist() == [0.0, np.float32(1e-38).item()]
    assert nf4.quantize(z, double_quant=False, target="cuda").absmax.tolist() == [0.0, 0.0]
    assert torch.equal(nf4.dequantize(zc), nf4.dequantize(zg).abs())  # both are zeros (CUDA's are -0.0 * 0)

    print(f"cuda vs cpu target, 4096x1024 fp16: {n_diff} of {d.numel()} absmax codes differ "
          f"({100 * n_diff / d.numel():.3f}%), packed bytes identical")
    assert "absmax codes differ" in capsys.readouterr().out


# -------------------------------------------------------------------------------- torch path (CUDA tensors) == C kernels
@pytest.mark.parametrize("target", nf4.TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_torch_path_equals_cpu_kernel_path(dtype, target):
    for case in ("randn 128x256", "numel%64 100x37", "odd 3x5", "1x1", "1x1 zero", "zero blocks", "zero tail",
                 "all zero", "heavy tails", "near threshold"):
        w = (_near_threshold_blocks(64, 25) if case == "near threshold" else CASES[case]()).to(dtype)
        for blocksize in (64, 256):
            p1, a1, bad1 = nf4._quantize_4bit_cpu(w, blocksize, target)
            p2, a2, bad2 = nf4._quantize_4bit_torch(w, blocksize, target, chunk_blocks=3)  # several chunks
            assert torch.equal(p1, p2), (case, blocksize)
            assert torch.equal(a1.view(torch.int32), a2.view(torch.int32)), (case, blocksize)
            assert bad1 == bad2 == 0


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("where", ["full block", "tail"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_weights_are_refused(where, bad):
    w = _randn(10, 70, seed=26).to(torch.bfloat16)
    w.view(-1)[5 if where == "full block" else 650] = bad
    with pytest.raises(InputError, match="model.layers.3.mlp.up_proj.weight.*1 NaN/Inf") as exc:
        nf4.quantize(w, name="model.layers.3.mlp.up_proj.weight")
    assert exc.value.hint and "source checkpoint" in exc.value.hint
    for target in nf4.TARGETS:
        assert nf4._quantize_4bit_torch(w, 64, target)[2] == nf4._quantize_4bit_cpu(w, 64, target)[2] == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(w=torch.ones(4, 4, dtype=torch.int32)), "float16, bfloat16 or float32"),
    (dict(w=torch.ones(4, 4, dtype=torch.float64)), "float16, bfloat16 or float32"),
    (dict(w=torch.ones(4, 64), blocksize=48), "block-size 48"),
    (dict(w=torch.ones(4, 64), blocksize=8192), "block-size 8192"),
    (dict(w=torch.ones(4, 64), target="tpu"), "unknown target"),
    (dict(w=torch.ones(0, 64)), "empty"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        nf4.quantize(**kwargs)


def test_input_is_not_modified_and_layout_does_not_matter():
    w = _randn(96, 128, seed=27)
    before = w.clone()
    qw = nf4.quantize(w, target="cpu")
    assert torch.equal(w, before)
    wt = _randn(128, 96, seed=27).t()  # non-contiguous view
    assert torch.equal(nf4.quantize(wt, target="cpu").packed, nf4.quantize(wt.contiguous(), target="cpu").packed)
    assert qw.numel == 96 * 128 and qw.nbytes == qw.packed.nbytes + qw.absmax.nbytes + qw.nested_absmax.nbytes


# ----------------------------------------------------------------------------------------------- reconstruction
def test_reconstruction_error_against_direct_computation():
    w = _randn(256, 512, seed=28, scale=0.02).to(torch.bfloat16)
    qw = nf4.quantize(w)
    e = nf4.reconstruction_error(w, qw)
    x = w.double()
    xh = (torch.tensor(nf4.NF4_CODE)[nf4.unpack_nibbles(qw.packed, w.numel()).long()].view(-1, 64)
          * nf4.absmax_fp32(qw).view(-1, 1)).view_as(w).double()
    rel = float((x - xh).norm() / x.norm())
    assert e["rel_error"] == pytest.approx(rel, rel=1e-9)
    assert e["max_abs_error"] == pytest.approx(float((x - xh).abs().max()), rel=1e-12)
    assert e["snr_db"] == pytest.approx(-20 * math.log10(rel), rel=1e-9)
    assert e["nonfinite"] == 0
    # NF4 on Gaussian weights: ~9.2% relative error; double quantisation adds well under 1% of that
    assert 0.085 < e["rel_error"] < 0.10
    assert e["ideal_rel_error"] <= e["rel_error"] < 1.01 * e["ideal_rel_error"]
    # without double quantisation the stored absmax is the exact one
    e0 = nf4.reconstruction_error(w, nf4.quantize(w, double_quant=False))
    assert e0["rel_error"] == pytest.approx(e0["ideal_rel_error"], rel=1e-12)


def test_reconstruction_error_sees_damaged_constants():
    w = _randn(256, 512, seed=29, scale=0.02)
    qw = nf4.quantize(w)
    damaged = nf4.QuantizedWeight(qw.packed, qw.absmax, qw.nested_absmax * 1.5, qw.offset, qw.shape, qw.dtype)
    e = nf4.reconstruction_error(w, damaged)
    assert e["rel_error"] > 1.2 * e["ideal_rel_error"]


@pytest.mark.parametrize("target", nf4.TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_error_measured_while_quantising_equals_reconstruction_error(dtype, target):
    """quantize_with_error measures in the quantising pass what reconstruction_error measures afterwards, from the
    stored tensors: the same numbers to the last bit, and the same QuantizedWeight as quantize."""
    cases = dict(CASES, **{"near threshold": lambda: _near_threshold_blocks(64, 25),
                           "many groups 700x300": lambda: _randn(700, 300, seed=31, scale=0.02)})
    for case, make in cases.items():
        w = make().to(dtype)
        for blocksize, double_quant in ((64, True), (64, False), (32, True), (256, True), (4096, False)):
            qw, error = nf4.quantize_with_error(w, blocksize, double_quant, target)
            ref = nf4.quantize(w, blocksize, double_quant, target)
            assert torch.equal(qw.packed, ref.packed) and torch.equal(qw.absmax, ref.absmax), case
            assert qw.offset == ref.offset and (not double_quant or torch.equal(qw.nested_absmax, ref.nested_absmax))
            assert error == nf4.reconstruction_error(w, qw), (case, blocksize, double_quant)
            assert error["bad_constants"] == error["nonfinite"] == 0


def test_measured_error_is_the_fp64_sum():
    """The fused statistics against a direct fp64 computation, on a tensor of many kernel work groups."""
    w = _randn(1000, 999, seed=32, scale=0.02).to(torch.float16)
    qw, e = nf4.quantize_with_error(w, target="cpu")
    x = w.double().view(-1)
    code = torch.tensor(nf4.NF4_CODE)[nf4.unpack_nibbles(qw.packed, w.numel()).long()]
    blocks = torch.arange(w.numel()) // 64
    xh = (code * nf4.absmax_fp32(qw)[blocks]).double()
    exact = x.view(-1).abs().float().reshape(-1)
    exact = torch.zeros(blocks[-1] + 1).scatter_reduce(0, blocks, exact, "amax")
    ideal = (code * exact[blocks]).double()
    assert e["rel_error"] == pytest.approx(float((x - xh).norm() / x.norm()), rel=1e-12)
    assert e["ideal_rel_error"] == pytest.approx(float((x - ideal).norm() / x.norm()), rel=1e-12)
    assert e["max_abs_error"] == float((x - xh).abs().max())


def test_measured_error_of_damaged_constants_and_nonfinite_output():
    w = _randn(300, 200, seed=33, scale=0.02)
    qw = nf4.quantize(w, target="cpu")
    one_block = qw.absmax.clone()
    one_block[517] = (int(one_block[517]) + 60) % 256
    e = nf4.reconstruction_error(w, nf4.QuantizedWeight(qw.packed, one_block, qw.nested_absmax, qw.offset, qw.shape,
                                                        qw.dtype))
    assert e["bad_constants"] == 1 and e["nonfinite"] == 0
    nested = qw.nested_absmax.clone()
    nested[1] = float("inf")  # blocks 256..511: 256 blocks of 64 non-finite values
    e = nf4.reconstruction_error(w, nf4.QuantizedWeight(qw.packed, qw.absmax, nested, qw.offset, qw.shape, qw.dtype))
    assert e["nonfinite"] == 256 * 64 and e["bad_constants"] == 0


def test_quantize_with_error_refuses_nonfinite_weights():
    w = _randn(10, 70, seed=26)
    w.view(-1)[650] = math.nan
    with pytest.raises(InputError, match="'w'.*1 NaN/Inf"):
        nf4.quantize_with_error(w, name="w")


def test_kernel_threads_is_per_thread_and_restored():
    import threading

    from qtool.nf4 import _cpu

    before = _cpu.threads()
    with nf4.kernel_threads(_cpu.available_cores()):
        assert _cpu.threads() == 1
        seen = []
        other = threading.Thread(target=lambda: seen.append(_cpu.threads()))
        other.start()
        other.join()
        assert seen == [_cpu.available_cores()]  # another thread keeps the default
    assert _cpu.threads() == before


@pytest.mark.parametrize("n_threads", [1, 3, 8])
def test_results_do_not_depend_on_the_thread_count(n_threads):
    """Work is split by groups of blocks whose results land in their own slots: the bytes and the measured error are
    the same whatever the number of threads (and whichever thread ran which group)."""
    from qtool.nf4 import _cpu

    w = _randn(700, 300, seed=35, scale=0.02).to(torch.bfloat16)  # 3,282 blocks: 13 groups, the last partial
    _cpu.set_threads(1)
    try:
        ref_qw, ref_error = nf4.quantize_with_error(w, target="cpu")
        ref_out = nf4.dequantize(ref_qw)
        _cpu.set_threads(n_threads)
        qw, error = nf4.quantize_with_error(w, target="cpu")
        assert torch.equal(qw.packed, ref_qw.packed) and torch.equal(qw.absmax, ref_qw.absmax)
        assert error == ref_error == nf4.reconstruction_error(w, qw)
        assert torch.equal(nf4.dequantize(qw), ref_out)
    finally:
        _cpu.set_threads(None)


def test_dequantize_dtype_override_and_device_move():
    w = _randn(33, 65, seed=30).to(torch.float16)
    qw = nf4.quantize(w, target="cpu").to("cpu")
    assert nf4.dequantize(qw, torch.float32).dtype == torch.float32
    assert torch.equal(nf4.dequantize(qw, torch.float32).half(), nf4.dequantize(qw))


# ------------------------------------------------------------------------------------------------ kernel builds
def test_a_build_of_another_source_is_never_loaded(tmp_path, monkeypatch):
    """An installed build whose embedded sha256 is not the source's (an edited checkout, an old build) is passed
    over for the per-user build of the current source."""
    from qtool.nf4 import _build, _cpu

    current = _cpu.library()._name  # the build of the current source (compiled on first use if needed)
    stale = tmp_path / ("_cpu_kernels" + ".so")
    _build.build(stale, "0" * 64)
    assert _cpu._open(stale).qtool_source_sha256().decode() == "0" * 64
    monkeypatch.setattr(_build, "installed_path", lambda: stale)
    monkeypatch.setattr(_build, "cached_path", lambda sha: type(tmp_path)(current))
    monkeypatch.setattr(_build, "build", lambda *a: pytest.fail("the current build exists: nothing to compile"))
    assert _cpu._load()._name == current


def test_no_compiler_is_a_clear_error(tmp_path, monkeypatch):
    from qtool.nf4 import _build

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="not built and cannot be compiled here: .*no-such-cc") as exc:
        _build.build(tmp_path / "k.so", "1" * 64)
    assert "pip install qtool" in str(exc.value) and not list(tmp_path.iterdir())  # no temporary file left


def test_dequantize_uses_flat_blocks_when_blocks_span_rows():
    """With an even row length that is not a multiple of the block size, a block spans two rows: the constant of
    element i is absmax[i // blocksize] over the flattened tensor (the format, as bitsandbytes' reference and CUDA
    kernels read it), never a per-row index. (bitsandbytes 0.50.2's AVX-512 C++ CPU kernel, where it is registered,
    indexes per row; we follow the format.)"""
    w = _randn(600, 96, seed=11).to(torch.float16)
    packed, qs = bnb_quantize(w, double_quant=False)
    qw = nf4.quantize(w, double_quant=False, target="cpu")
    ours = nf4.dequantize(qw)
    reference = _bnb_reference_dequantize(packed.reshape(-1), qs.absmax, _bnb_nf4_code(), 64, qs.shape, w.dtype)
    assert torch.equal(ours, reference)
    flat = torch.tensor(nf4.NF4_CODE)[nf4.unpack_nibbles(qw.packed, w.numel()).long()]
    expected = (flat * qw.absmax.repeat_interleave(64)[: w.numel()]).to(torch.float16).view(600, 96)
    assert torch.equal(ours, expected)
    # a per-row reading (each row starting a new block) gives other values on this shape: the test has teeth
    per_row = qw.absmax[(torch.arange(600)[:, None] * 2 + (torch.arange(96) >= 64)) % qw.absmax.numel()]
    assert not torch.equal(ours, (flat.view(600, 96) * per_row).to(torch.float16))
