"""Candidates of an ``auto`` search quantized ahead, in one child process, while the search evaluates others.

Quantizing is mostly single-threaded Python (onnxruntime's per-channel weight loop, graph rewriting), so on a
host whose cores the search's evaluations leave partly idle a second process shortens the build. Timings must
still run alone: ``paused()`` stops the child (SIGSTOP) for as long as anything is timed, and the host-load
watch counts the child's CPU time as this build's own.

The child's first job is onnxruntime's pre-processing of the input (the search waits for it before it needs
the pre-processed graph), then the candidates in the order the search takes them. It runs on one core, so that
the onnxruntime sessions in it (static calibration) start one thread and leave the other core to the build's
evaluation. A graph either process writes (pre-processing, smoothing, the outlier split) is written under a
scratch name and renamed, so neither reads half of one; the child quantizes from a link of its own to each input,
since onnxruntime writes a scratch file beside its input. The child reads one job per line on stdin and answers
one line per job on stdout; it dies with the build (end of stdin, or the parent's death).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeops.compress.data import Dataset

MIN_MODEL_BYTES = 8 << 20  # below this, quantizing takes less than starting the child (it imports onnxruntime)

_LIVE: set[subprocess.Popen[str]] = set()  # children to stop while something is timed
_LOCK = threading.Lock()
_timing = 0  # timings in progress (builds may run in threads): children run again when the last one ends


def _signal_all(signum: int) -> None:
    for process in _LIVE:
        if process.poll() is None:
            process.send_signal(signum)
    if signum == signal.SIGSTOP:  # a signal arrives asynchronously: the timing starts once each child is stopped
        for process in _LIVE:
            deadline = time.monotonic() + 0.5
            while process.poll() is None and _state(process.pid) not in ("T", "Z", "X", "") and \
                    time.monotonic() < deadline:
                time.sleep(0.001)


def _stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state first); [] once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _state(pid: int) -> str:
    return (_stat(pid) or [""])[0]


@contextmanager
def paused() -> Iterator[None]:
    """Stop every child quantizing ahead for the duration of the block (a timing runs alone)."""
    global _timing
    with _LOCK:
        _timing += 1
        if _timing == 1:
            _signal_all(signal.SIGSTOP)
    try:
        yield
    finally:
        with _LOCK:
            _timing -= 1
            if _timing == 0:
                _signal_all(signal.SIGCONT)


def working() -> bool:
    """Whether a child is quantizing now (running, or stopped while something is timed), rather than waiting for
    a job: then the build's evaluations take one thread and leave the child its core."""
    with _LOCK:
        live = list(_LIVE)
    return any(_state(process.pid) in ("R", "D", "T") for process in live)


def live_cpu_s() -> float:
    """CPU seconds the running children have used so far (counted as this build's own, not foreign load)."""
    total = 0.0
    with _LOCK:
        live = list(_LIVE)
    for process in live:
        if len(fields := _stat(process.pid)) > 12:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


@dataclass(frozen=True)
class Job:
    """One candidate to quantize: ``run_mode(mode, src, options)``, its file named after ``label``."""

    label: str
    mode: str
    src: Path
    options: dict[str, Any]


class Ahead:
    """The parent's side: submit jobs, take their results (waiting if needed), close."""

    def __init__(self, work_dir: Path, index: int, accelerator: str, generative: bool,
                 calibration: dict[str, np.ndarray]) -> None:
        self.submitted: dict[str, Job] = {}
        self.results: dict[str, dict[str, Any]] = {}
        calibration_path = work_dir / f"{index:02d}-ahead-calibration.npz"
        np.savez(calibration_path, **calibration)  # type: ignore[arg-type]  # (numpy stubs: allow_pickle)
        setup = {"work_dir": str(work_dir), "index": index, "accelerator": accelerator, "generative": generative,
                 "calibration": str(calibration_path)}
        self.process = subprocess.Popen([sys.executable, "-m", "edgeops.compress.ahead", json.dumps(setup)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        cwd=work_dir, text=True, start_new_session=True)
        with _LOCK:
            _LIVE.add(self.process)
            if _timing:
                self.process.send_signal(signal.SIGSTOP)

    def submit(self, job: Job) -> None:
        if job.label in self.submitted or self.process.poll() is not None:
            return
        self.submitted[job.label] = job
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps({"label": job.label, "mode": job.mode, "src": str(job.src),
                                                 "options": job.options}) + "\n")
            self.process.stdin.flush()
        except OSError:
            del self.submitted[job.label]

    def take(self, job: Job) -> tuple[Path, list[str]] | None:
        """The candidate the child made for ``job`` (waiting for it); None when it was not submitted as such,
        or failed (the caller quantizes it itself and sees the error there)."""
        if self.submitted.get(job.label) != job:
            return None
        assert self.process.stdout is not None
        while job.label not in self.results:
            line = self.process.stdout.readline()
            if not line:
                return None
            answer = json.loads(line)
            self.results[answer["label"]] = answer
        answer = self.results[job.label]
        if answer.get("error"):
            return None
        return Path(answer["path"]), list(answer["notes"])

    def close(self) -> None:
        """Stop the child (jobs not taken are dropped) and reap it."""
        if self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        with _LOCK:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            _LIVE.discard(self.process)


@dataclass
class AheadContext:
    """The child's ``QuantizeContext``: paths under the build's work directory, the calibration data."""

    work_dir: Path
    index: int
    accelerator: str
    generative: bool
    calibration: Dataset

    preprocess_here = True  # the child is already beside the build: no process of its own

    def progress(self, message: str) -> None:
        pass

    def path(self, name: str) -> Path:
        return self.work_dir / f"{self.index:02d}-{name}.onnx"

    def own_copy(self, path: Path) -> Path:
        own = self.work_dir / f"{self.index:02d}-ahead" / path.name
        if not own.exists():
            own.parent.mkdir(exist_ok=True)
            own.symlink_to(path.resolve())
        return own


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main() -> None:
    """The child: quantize each job read from stdin, answer with its path and notes (or its error)."""
    _die_with_parent()
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # one core: onnxruntime's pools in it start one thread
    from edgeops.compress.quantize import PREPROCESS, prepared_for, run_mode
    from edgeops.manifest.models import QuantizeOptions

    setup = json.loads(sys.argv[1])
    calibration = Dataset(dict(np.load(setup["calibration"])), None, "")
    ctx = AheadContext(Path(setup["work_dir"]), setup["index"], setup["accelerator"], setup["generative"],
                       calibration)
    for line in sys.stdin:
        job = json.loads(line)
        notes: list[str] = []
        answer: dict[str, Any] = {"label": job["label"]}
        try:
            if job["mode"] == PREPROCESS:
                path = prepared_for(Path(job["src"]), ctx, notes)
            else:
                path = run_mode(job["mode"], Path(job["src"]), QuantizeOptions.model_validate(job["options"]),
                                ctx, notes, label=job["label"].replace(" ", "-"))
            answer.update(path=str(path), notes=notes)
        except Exception as exc:  # noqa: BLE001 - the parent quantizes it again and reports the error
            answer["error"] = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
