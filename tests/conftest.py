"""Settings for the whole test run.

The tests train models of a few thousand parameters, where a second CPU thread costs
more in coordination than it computes, and where two threads per pytest worker would
oversubscribe a small machine. Each process of the run (workers, and the DDP ranks they
fork) computes on one thread.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # after the environment variable, which torch reads on import

torch.set_num_threads(1)
