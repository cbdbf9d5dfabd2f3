"""Flow 3: converted NF4 shards -> adapter training -> memory measured beside the plan. :mod:`.model` the decoder,
:mod:`.fused` its Triton kernels, :mod:`.data` text packing, :mod:`.recipe` the training loop, :mod:`.measure` memory."""
