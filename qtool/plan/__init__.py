"""Flow 2: model config -> byte plan. Pure Python: nothing in this package imports torch or numpy.

:mod:`.settings` holds what is trained and how (and the values each setting takes), :mod:`.planner` assembles the
rows and phases, :mod:`.fit` solves for what fits (a capacity, the GPU table, GPU counts), :mod:`.records` plans
measurement records as they ran, :mod:`.resident` holds the resident items and the measured constants,
:mod:`.transient` the activations and other transient items, :mod:`.fsdp` the per-GPU shards and FSDP2 buffers of
``--gpus N``, :mod:`.notes` the notes under a plan, :mod:`.rows` the line item they all build."""
