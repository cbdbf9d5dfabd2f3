"""The NF4 + double-quantisation format in memory (:mod:`.codec`), its CPU kernels (:mod:`._cpu`: C, compiled ahead
of time by :mod:`._build`) and its GPU dequantisation kernel (:mod:`.gpu`, Triton)."""
