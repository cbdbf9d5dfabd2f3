"""The NF4 + double-quantisation format in memory (:mod:`.codec`), its CPU kernels (:mod:`._cpu`: C, compiled ahead
of time by :mod:`._build`), bitsandbytes' GPU arithmetic for exact GPU bytes (:mod:`.gpu_bytes`) and the GPU
dequantisation kernel (:mod:`.gpu`, Triton)."""
