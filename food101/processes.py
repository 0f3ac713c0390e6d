"""Child processes: worker pools for the data stages' CPU-bound loops, and stopping them all.

Workers fork from multiprocessing's forkserver: a clean, single-threaded process started once,
not the caller, which may be running Prefect's and MLflow's threads (forking a threaded process
can deadlock). The server imports the stages' worker modules once, so every worker forked from it
starts with them loaded instead of importing Prefect, pandas and PIL again (about 1.4 s each).

A run killed with SIGKILL cannot stop its children. The forkserver exits by itself when its
parent's pipe closes; workers ask the kernel for SIGKILL when their parent dies; Prefect's
ephemeral API server (a `uvicorn` subprocess that Prefect starts without either) is stopped by a
small reaper process that watches the run's descendants and stops them when the run is gone.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import select
import signal
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import psutil

# Modules whose functions the pools run. The forkserver reads this list once, when it starts,
# so every stage's worker module is named here whichever stage starts it first.
WORKER_MODULES = ["tasks.validate", "tasks.preprocess", "food101.speed"]

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_TIMEOUT_S = 5.0
REAPER_POLL_S = 0.5


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` processes forked from the preloaded forkserver."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_MODULES)
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=die_with_parent)


def start_forkserver() -> None:
    """Start the preloaded forkserver now, if it is not running, and return once it forks workers.

    Its first start imports WORKER_MODULES (Prefect, pandas, torch: seconds of CPU, in a process
    that is not this one's waited-for child); a timing that starts it inside its window reads that
    work as another process's (the demo's first-timed model: 30% of the CPU "busy elsewhere").
    Forking one worker that does nothing waits until the imports are done.
    """
    with process_pool(1) as pool:
        pool.submit(os.getpid).result()


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def stop_processes(processes: list[psutil.Process], timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, then SIGKILL what is left after `timeout_s`; returns how many were running."""
    running = []
    for proc in processes:
        try:
            proc.terminate()  # psutil refuses a PID that was reused by another process
            running.append(proc)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(running, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)
    return len(running)


def stop_descendants(timeout_s: float = STOP_TIMEOUT_S) -> int:
    """Stop every process this one started, and theirs."""
    return stop_processes(psutil.Process().children(recursive=True), timeout_s)


_reaper: subprocess.Popen | None = None


def start_reaper() -> None:
    """Start a process that stops this one's descendants once this one is gone, however it ended.

    It learns of the end through its stdin: the kernel closes this process's end of the pipe
    when it exits, SIGKILL included. The handle stays referenced for the life of the process
    (collecting it would close the pipe early).
    """
    global _reaper
    if _reaper is None:
        _reaper = subprocess.Popen(
            [sys.executable, "-c", f"from food101.processes import reap; reap({os.getpid()})"],
            stdin=subprocess.PIPE,
        )


def reap(parent_pid: int, poll_s: float = REAPER_POLL_S) -> None:
    """The reaper's loop: note `parent_pid`'s descendants until its pipe closes, then stop them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; outlive it
    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        return
    me = os.getpid()
    seen: dict[int, psutil.Process] = {}
    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([stdin], [], [], poll_s)
        if ready and not os.read(stdin, 1):
            break
        try:
            for child in parent.children(recursive=True):
                if child.pid != me:
                    seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
    stop_processes([proc for proc in seen.values() if proc.is_running()])
