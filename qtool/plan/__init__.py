"""Flow 2: model config -> byte plan. Pure Python: nothing in this package imports torch or numpy.

:mod:`.planner` assembles the rows and phases, :mod:`.resident` holds the resident items and the measured constants,
:mod:`.transient` the activations and other transient items."""
