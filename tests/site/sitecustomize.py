"""Imported by every Python process the test suite starts (``tests/conftest.py`` puts this
directory first on ``PYTHONPATH``): xdist workers, ``launch`` commands, workers, the guides'
snippets and the notebooks' Jupyter kernels.

It sets the garbage collector's thresholds the ``launch`` commands set for themselves
(``launch.common.GC_THRESHOLDS``, whose comment has the measurement; ``tests/test_launch.py``
checks that the two agree) in the processes that are not ``launch`` commands too. It changes
how often Python looks for reference cycles, not what any program computes.
"""

import gc

THRESHOLDS = (10_000, 10, 10)
gc.set_threshold(*THRESHOLDS)
