"""Settings shared by tlreg's test suite and the plugin's (this file sits above both).

One intra-op thread per process: the tests run DataLoader workers and subprocesses beside the
main process, and on a 2-core machine OpenMP threads that spin-wait for a busy core make each op
up to a hundred times slower. Subprocesses inherit the variable. Speed is measured in `bench/`,
never by the tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure() -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
