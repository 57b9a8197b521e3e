"""Speed, memory and accuracy measurements of the adversarial training callbacks.

Run each script from the repository root as a module, e.g. ``python -m
benchmarks.step_time`` (``make bench`` runs step time, memory and robustness). Each writes
its own marked section of ``docs/benchmarks.md`` and a figure in ``docs/img/``; ``--quick``
runs a tiny version into the folder given by ``--out``.
"""
