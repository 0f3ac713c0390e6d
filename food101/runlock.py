"""One run at a time per outputs folder, and nothing left behind by a run that was stopped.

Two runs writing the same outputs corrupt each other (one registers the other's weights), so
`food101 run`, `food101 stage` and the flow itself take an exclusive lock first. The lock is an
fcntl lock on `<outputs>/.state/run.lock`, where `<outputs>` is the deepest folder holding every
generated path (the project folder with the default params; a test's temporary root with its
`--set paths.*` overrides). Outputs spread over several trees (a common folder above the project
folder) fall back to the project folder. The kernel drops the lock when its holder dies, so a
killed run never leaves a stale lock; the holder's PID, start time and command are written into
the file for the message the next run prints.

The lock is re-entrant within one process: `food101 run` takes it before Prefect starts and the
flow takes it again. Whoever takes it first in a process cleans up after a run that was killed
(SIGKILL cannot be handled): MLflow runs of dead processes are marked KILLED and temporary files
of interrupted atomic writes (food101/io.py) are removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from food101.config import Config, Paths
from food101.env import STATE_DIR
from food101.errors import Food101Error

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
# The names food101.io gives temporary files and staging folders: `.<final name>.tmp-<random>`.
TEMP_NAME = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+$")
# Generated paths (config.paths) that are folders; the rest are single files. `sample` is input.
FILE_OUTPUTS = ("dataset",)
NOT_OUTPUTS = ("sample",)
TRACKING = ("tracking_db", "tracking_artifacts")  # MLflow's own files: it writes no .tmp-* names
# Every other paths.* is a folder a stage writes through food101.io (a new stage's folder included).
FOLDER_OUTPUTS = tuple(f.name for f in dataclasses.fields(Paths)
                       if f.name not in NOT_OUTPUTS + FILE_OUTPUTS + TRACKING)

T = TypeVar("T")


class RunLocked(Food101Error):
    """Another process is running the benchmark on the same outputs."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: the command stops and cleans up (not an error of the work)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class _Held:
    fd: int
    depth: int


_held: dict[Path, _Held] = {}
_held_guard = threading.Lock()


def outputs_root(config: Config) -> Path:
    """The deepest folder holding every generated path, or the project folder when that is above it."""
    project = Path(config.project_dir).resolve()
    names = [field.name for field in dataclasses.fields(config.paths) if field.name not in NOT_OUTPUTS]
    outputs = [Path(getattr(config.paths, name)) for name in names]
    common = Path(os.path.commonpath(outputs))
    if common == project or project.is_relative_to(common):
        return project
    return common


def lock_path(config: Config) -> Path:
    return outputs_root(config) / STATE_DIR / LOCK_NAME


@contextlib.contextmanager
def run_lock(config: Config, wait: bool = False) -> Iterator[Path]:
    """Hold the outputs' run lock for the block; RunLocked if another process holds it (unless `wait`)."""
    path = lock_path(config)
    with _held_guard:
        held = _held.get(path)
        if held is not None:
            held.depth += 1
    if held is None:
        held = _acquire(path, wait)
        try:
            clean_up_after_killed_runs(config)
        except BaseException:
            _release(path, held)
            raise
    try:
        yield path
    finally:
        with _held_guard:
            held.depth -= 1
            last = held.depth == 0
        if last:
            _release(path, held)


def _acquire(path: Path, wait: bool) -> _Held:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Opened in place, never replaced: a lock on a renamed-over file would lock nothing.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise Food101Error(
            f"cannot create the run lock {path} ({exc.strerror}); keep the generated paths.* under one "
            "writable folder"
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            if not wait:
                raise RunLocked(
                    f"another food101 run is writing the outputs under {path.parent.parent} ({holder}); "
                    f"wait for it to finish or stop it, or pass --wait to queue behind it"
                ) from None
            log.info("waiting for the run lock %s, held by %s", path, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.pwrite(fd, f"PID {os.getpid()}, started {started}, command: {' '.join(sys.argv)[:500]}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    with _held_guard:
        held = _Held(fd, 1)
        _held[path] = held
    return held


def _release(path: Path, held: _Held) -> None:
    with _held_guard:
        _held.pop(path, None)
    os.ftruncate(held.fd, 0)
    fcntl.flock(held.fd, fcntl.LOCK_UN)
    os.close(held.fd)


def _holder_text(fd: int) -> str:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    return text or "a process that has not written its PID yet"


def clean_up_after_killed_runs(config: Config) -> None:
    """Mark MLflow runs of dead processes KILLED and remove interrupted writes; log what was cleaned."""
    from food101.tracking import mark_dead_runs_killed

    removed = remove_temp_files(config)
    killed = mark_dead_runs_killed(config)
    if removed or killed:
        log.warning(
            "cleaned up after a killed run: removed %d temporary file(s)%s; marked %d MLflow run(s) KILLED%s",
            len(removed), f" ({', '.join(str(p) for p in removed[:5])})" if removed else "",
            len(killed), f" ({', '.join(killed[:5])})" if killed else "",
        )


def remove_temp_files(config: Config) -> list[Path]:
    """Remove `.<name>.tmp-*` files and staging folders in and beside the output folders.

    Call it only while holding the run lock: then no writer of these outputs is alive.
    """
    found: list[Path] = []
    for key in FOLDER_OUTPUTS + FILE_OUTPUTS:
        output = Path(getattr(config.paths, key))
        found += _temp_siblings(output)
        if key in FOLDER_OUTPUTS and output.is_dir():
            for folder, dirs, files in os.walk(output):
                for name in [d for d in dirs if TEMP_NAME.match(d)]:
                    dirs.remove(name)
                    found.append(Path(folder) / name)
                found += [Path(folder) / name for name in files if TEMP_NAME.match(name)]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def _temp_siblings(output: Path) -> list[Path]:
    """Staging names food101.io gives `output` itself, next to it: `.<name>.tmp-*`."""
    if not output.parent.is_dir():
        return []
    return [p for p in output.parent.glob(f".{output.name}.tmp-*") if TEMP_NAME.match(p.name)]


def run_until_signalled(work: Callable[[], T]) -> T:
    """Run `work` on a thread while this (main) thread waits; SIGTERM/SIGINT raise Interrupted here.

    The work runs off the main thread so that a signal reaches a thread that is only waiting:
    the caller can stop children and mark runs at once instead of waiting for the flow's training
    threads to unwind (Prefect's task runner joins them), then leave with os._exit.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread below
            outcome["error"] = exc

    def interrupt(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    thread = threading.Thread(target=target, name="food101-command", daemon=True)
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


def shut_down(config: Config) -> str:
    """After Interrupted: stop child processes, mark this process's MLflow runs KILLED, remove
    temporary files. Returns what was done, for the one-line message."""
    from food101.processes import stop_descendants
    from food101.tracking import mark_runs_killed

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
    steps: list[tuple[str, Callable[[], str]]] = [
        ("stop child processes", lambda: f"stopped {stop_descendants()} child process(es)"),
        ("mark MLflow runs KILLED",
         lambda: f"marked {len(mark_runs_killed(config, os.getpid()))} MLflow run(s) KILLED"),
        ("remove temporary files", lambda: f"removed {len(remove_temp_files(config))} temporary file(s)"),
    ]
    done = []
    for what, step in steps:
        # The process exits right after this: a step that fails is reported, and the next run
        # (clean_up_after_killed_runs) finishes it.
        try:
            done.append(step())
        except Exception as exc:  # noqa: BLE001
            done.append(f"could not {what} ({type(exc).__name__}: {exc})")
    return ", ".join(done) + "; run the same command again to resume"
