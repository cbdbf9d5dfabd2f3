"""NF4 dequantisation throughput on a GPU: qtool's fused Triton kernel vs bitsandbytes' dequantize_4bit, for the
weight shapes of Llama-2-7B and LLaMA-65B (double quantisation, bf16 output). Prints GB/s counting bytes read
(packed + absmax) plus bytes written (bf16), and the median time over repeats.

    python bench/dequant_speed.py
"""
import torch

from qtool.nf4 import gpu as kernels

from qtool.nf4 import codec as nf4
from qtool.train.load import random_quantized


def median_ms(fn, reps=50):
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    import bitsandbytes.functional as F

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for shape in [(4096, 4096), (11008, 4096), (22016, 8192)]:
        qw = random_quantized(shape, "cuda", gen)
        n = shape[0] * shape[1]
        moved = n // 2 + n // 64 + n * 2
        out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
        t_ours = median_ms(lambda: kernels.dequantize_into(qw, torch.bfloat16, out))
        state = F.QuantState(absmax=qw.absmax, shape=torch.Size(shape), code=torch.tensor(nf4.NF4_CODE, device="cuda"),
                             blocksize=64, quant_type="nf4", dtype=torch.bfloat16, offset=torch.tensor(qw.offset, device="cuda"),
                             state2=F.QuantState(absmax=qw.nested_absmax, code=torch.from_numpy(nf4.dynamic_map_signed()).cuda(),
                                                 blocksize=256, dtype=torch.float32))
        t_bnb = median_ms(lambda: F.dequantize_4bit(qw.packed, state))
        same = torch.equal(kernels.dequantize_into(qw, torch.bfloat16), F.dequantize_4bit(qw.packed, state))
        rows.append((shape, t_ours, moved / t_ours / 1e6, t_bnb, moved / t_bnb / 1e6, same))
    print("shape            qtool ms   GB/s    bnb ms   GB/s   identical")
    for shape, a, ga, b, gb, same in rows:
        print(f"{str(shape):16s} {a:8.3f} {ga:6.0f} {b:9.3f} {gb:6.0f}   {same}")


if __name__ == "__main__":
    main()
