"""Worker processes for the data stages' CPU-bound loops (decoding, hashing).

Workers fork from multiprocessing's forkserver: a clean, single-threaded process started once,
not the caller, which may be running Prefect's and MLflow's threads (forking a threaded process
can deadlock). The server imports the stages' worker modules once, so every worker forked from it
starts with them loaded instead of importing Prefect, pandas and PIL again (about 1.4 s each).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

# Modules whose functions the pools run. The forkserver reads this list once, when it starts,
# so every stage's worker module is named here whichever stage starts it first.
WORKER_MODULES = ["tasks.validate", "tasks.preprocess"]


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` processes forked from the preloaded forkserver."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_MODULES)
    return ProcessPoolExecutor(max_workers=workers, mp_context=context)
