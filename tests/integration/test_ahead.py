"""Candidates quantized ahead in a child process: the same bytes as quantizing in the build, never running while
anything is timed, counted as the build's own CPU, and gone when the step ends."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeops.compress import ahead, hostload, quantize
from edgeops.compress.ahead import Ahead, Job, _state, live_cpu_s, paused
from edgeops.compress.data import Dataset
from edgeops.compress.evaluate import evaluation_session
from edgeops.manifest.models import QuantizeOptions
from edgeops.manifest.workspace import load_workspace
from labkit.artifacts import build_for
from labkit.repo import REPO

ENCODER = "examples/models/assistant_encoder.onnx"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Context:
    def __init__(self, work: Path) -> None:
        self.work_dir, self.index, self.calibration = work, 1, Dataset({}, None, "")

    accelerator, generative = "cpu", False

    def progress(self, message: str) -> None:
        pass

    def path(self, name: str) -> Path:
        return self.work_dir / f"{self.index:02d}-{name}.onnx"

    def own_copy(self, path: Path) -> Path:
        return path


def test_a_candidate_quantized_ahead_is_the_one_the_build_would_make_and_the_child_waits_while_timing(
        repo_copy: Path, tmp_path: Path) -> None:
    src = repo_copy / ENCODER
    options = QuantizeOptions.model_validate({"mode": "dynamic", "preprocess": False})
    here = tmp_path / "here"
    here.mkdir()
    made_here = quantize.run_mode("dynamic", src, options, _Context(here), [], label="dynamic-unprocessed")

    work = tmp_path / "work"
    work.mkdir()
    child = Ahead(work, 1, "cpu", False, {})
    try:
        job = Job("dynamic unprocessed", "dynamic", src, options.model_dump(mode="json"))
        child.submit(job)
        child.submit(Job("broken", "dynamic", tmp_path / "missing.onnx", options.model_dump(mode="json")))
        taken = child.take(job)
        assert taken is not None
        path, notes = taken
        assert _sha(path) == _sha(made_here) and "dynamic int8" in notes[0]
        assert child.take(Job("broken", "dynamic", tmp_path / "missing.onnx", options.model_dump(mode="json"))) is None
        assert child.take(Job("never submitted", "dynamic", src, {})) is None
        # the child's scratch files go beside its own link to the input, never beside the shared one
        assert (work / "01-ahead" / src.name).is_symlink() and not list(src.parent.glob("*-inferred*"))

        with paused():
            assert _state(child.process.pid) == "T"   # stopped for as long as something is timed
            with paused():                            # a second timing (another build's thread) keeps it stopped
                pass
            assert _state(child.process.pid) == "T"
        assert _state(child.process.pid) != "T"
        deadline = time.monotonic() + 60
        while ahead.working() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not ahead.working()  # done, it waits for a job: the build's evaluations may take every core
    finally:
        child.close()
    assert child.process.poll() is not None and child.process not in ahead._LIVE


def test_a_childs_cpu_is_the_builds_own_evaluations_leave_it_its_core_and_it_stops_while_paused(
        tmp_path: Path) -> None:
    model = REPO / ENCODER
    assert evaluation_session(model).get_session_options().intra_op_num_threads == 0  # no child: every core
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    ahead._LIVE.add(spinner)
    try:
        deadline = time.monotonic() + 60
        while live_cpu_s() < 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ahead.working() and evaluation_session(model).get_session_options().intra_op_num_threads == 1
        own_before = hostload._own_cpu_s()
        assert live_cpu_s() >= 0.2 and own_before >= live_cpu_s()  # the spinning child is the build's own load
        with paused():
            time.sleep(0.1)  # SIGSTOP takes effect before the next tick
            stopped_at = live_cpu_s()
            time.sleep(0.5)
            assert live_cpu_s() - stopped_at <= 0.02  # one clock tick at most
            assert ahead.working()  # stopped only while something is timed: it goes on after
    finally:
        ahead._LIVE.discard(spinner)
        spinner.kill()
        spinner.wait()


def test_an_auto_build_takes_what_the_child_quantized_and_leaves_no_child(
        repo_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ahead, "MIN_MODEL_BYTES", 0)  # the example encoder is small; a real one is tens of MB
    taken: list[str] = []
    original_take = Ahead.take

    def spy(self: Ahead, job: Job) -> tuple[Path, list[str]] | None:
        result = original_take(self, job)
        if result is not None:
            taken.append(job.label)
        return result

    monkeypatch.setattr(Ahead, "take", spy)
    children: list[Path] = []
    original_init = Ahead.__init__

    def counted(self: Ahead, work: Path, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        original_init(self, work, *args, **kwargs)
        children.append(work)

    monkeypatch.setattr(Ahead, "__init__", counted)
    started: list[Path] = []
    monkeypatch.setattr(quantize.Preprocessing, "__init__", lambda self, src, dst: started.append(dst))
    manifest = repo_copy / "manifests" / "assistant.yaml"
    manifest.write_text(manifest.read_text().replace("    - quantize: {mode: dynamic, per_channel: true}\n",
                                                     "    - quantize: {mode: auto}\n"))
    report = build_for(load_workspace(repo_copy), "vehicle-assistant", "cpu").report
    tried = [c["mode"] for c in report["stages"][1]["candidates"]]
    # the child pre-processed the input (no process of the build's own did), then quantized every mode ahead, and
    # the unprocessed dynamic graph when the search reached it
    assert taken[0] == quantize.PREPROCESS and not started and len(children) == 1
    assert {"static", "dynamic"} <= set(taken) and all(label in tried for label in taken[1:])
    assert ("dynamic unprocessed" in taken) == ("dynamic unprocessed" in tried)
    assert not ahead._LIVE and not quantize._AHEAD
    assert report["stages"][1]["quality"]["passed"]

    # a rebuild after a changed goal finds every mode's candidate in the candidate cache: no child starts (its
    # pre-processing would have held the evaluations to one core), nothing taken from it before is quantized again
    quantized_here: list[str] = []
    original_run_mode = quantize.run_mode

    def run_mode(mode: str, src: Path, options: QuantizeOptions, *args, **kwargs) -> Path:  # type: ignore[no-untyped-def]
        quantized_here.append(kwargs.get("label") or mode)
        return original_run_mode(mode, src, options, *args, **kwargs)

    monkeypatch.setattr(quantize, "run_mode", run_mode)
    manifest.write_text(manifest.read_text().replace("max_drop: 0.05 ", "max_drop: 0.049 "))
    again = build_for(load_workspace(repo_copy), "vehicle-assistant", "cpu").report
    assert len(children) == 1 and not started and not ahead._LIVE and not quantize._AHEAD
    assert not {label.replace(" ", "-") for label in taken[1:]} & set(quantized_here), quantized_here
    assert {c["mode"] for c in again["stages"][1]["candidates"]} >= {"static", "dynamic"}


def test_a_close_calls_side_by_side_is_the_builds_speed_claim(repo_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto's close call (input against its pick) and the build's claim are one A/B, unless the first was taken on
    a busy host (then the claim tries again)."""
    import numpy as np

    from edgeops.compress import evaluate
    from edgeops.compress.evaluate import Evaluator
    from edgeops.manifest.models import QualityGoal

    calls: list[tuple[Path, Path]] = []
    original_ab = evaluate.interleaved_p50

    def counted(first: Path, second: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((first, second))
        return original_ab(first, second, *args, **kwargs)

    monkeypatch.setattr(evaluate, "interleaved_p50", counted)
    model = repo_copy / "examples" / "models" / "digits_cnn.onnx"
    data = dict(np.load(repo_copy / "examples" / "data" / "digits_evaluation.npz"))
    evaluator = Evaluator(QualityGoal(metric="accuracy", max_drop=1.0),
                          Dataset({k: v for k, v in data.items() if k != "labels"}, None, ""))
    evaluator.side_by_side_p50(model, model)
    first, taken = len(calls), evaluator.claims[(model, model)]
    claim = evaluator.speed_claim(model, model)
    if taken["measurable"]:  # the close call's A/B is the claim
        assert claim is taken and len(calls) == first
    else:  # the close call's host was busy: the claim is taken again
        assert len(calls) == first + claim["attempts"]


def test_no_child_outlives_a_build_whose_original_fails_to_evaluate(
        repo_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeops.compress import evaluate
    from edgeops.errors import BuildError

    monkeypatch.setattr(ahead, "MIN_MODEL_BYTES", 0)
    started: list[Ahead] = []
    original_init = Ahead.__init__

    def record(self: Ahead, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        original_init(self, *args, **kwargs)
        started.append(self)

    def broken(self, source, settle):  # type: ignore[no-untyped-def]
        raise BuildError("the original model does not run here")

    monkeypatch.setattr(Ahead, "__init__", record)
    monkeypatch.setattr(evaluate.Evaluator, "reference_from", broken)
    manifest = repo_copy / "manifests" / "assistant.yaml"
    manifest.write_text(manifest.read_text().replace("    - quantize: {mode: dynamic, per_channel: true}\n",
                                                     "    - quantize: {mode: auto}\n"))
    with pytest.raises(BuildError):
        build_for(load_workspace(repo_copy), "vehicle-assistant", "cpu")
    assert started and all(child.process.poll() is not None for child in started)
    assert not ahead._LIVE and not quantize._AHEAD
