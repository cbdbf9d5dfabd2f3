"""The NF4 + double-quantisation format in memory (:mod:`.codec`), its CPU kernels (:mod:`._cpu`, numba) and its GPU
dequantisation kernel (:mod:`.gpu`, Triton)."""
