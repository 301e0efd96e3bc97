"""Content-addressed artifact cache.

The key is the sha256 of a canonical JSON document holding the full sha256 of
every input (model bytes, calibration and evaluation data), the canonical
recipe and quality goal, the target accelerator class and the versions of
edgeops, onnx and onnxruntime. Entries are written to a temporary directory
and renamed into place, so a crash never leaves a half-written artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_FILE, REPORT_FILE, GOLDEN_FILE = "model.onnx", "report.json", "golden.npz"


def canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(inputs)).hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A built model with its report, as stored in the cache."""

    key: str
    directory: Path
    hit: bool = False

    @property
    def model(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def golden(self) -> Path:
        return self.directory / GOLDEN_FILE

    @property
    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads((self.directory / REPORT_FILE).read_text())
        return report

    @property
    def model_sha256(self) -> str:
        return str(self.report["artifact"]["sha256"])


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _entry(self, key: str) -> Path:
        return self.root / "artifacts" / key

    def get(self, key: str) -> Artifact | None:
        entry = self._entry(key)
        if (entry / REPORT_FILE).is_file() and (entry / MODEL_FILE).is_file():
            return Artifact(key, entry, hit=True)
        return None

    def model_of(self, model_sha256: str) -> Path | None:
        """The model file of the artifact whose model has this digest, if this cache holds it."""
        for report_file in sorted((self.root / "artifacts").glob(f"*/{REPORT_FILE}")):
            try:
                report = json.loads(report_file.read_text())
            except (OSError, ValueError):
                continue
            model = report_file.parent / "model.onnx"
            if report.get("artifact", {}).get("sha256") == model_sha256 and model.is_file():
                return model
        return None

    def report_of(self, model_sha256: str, key: str | None = None) -> dict[str, Any] | None:
        """The build report of the artifact whose model has this digest, if this cache built it: the one of
        build ``key`` (what a rollout's plan quoted) when given, else the newest (one set of numbers for one
        artifact everywhere, however often identical bytes were built)."""
        files = sorted((self.root / "artifacts").glob(f"*/{REPORT_FILE}"),
                       key=lambda f: (not (key and f.parent.name == key), -f.stat().st_mtime))
        for report_file in files:
            try:
                report: dict[str, Any] = json.loads(report_file.read_text())
            except (OSError, ValueError):
                continue
            if report.get("artifact", {}).get("sha256") == model_sha256:
                return report
        return None

    def put(self, key: str, files: dict[str, Path], report: dict[str, Any]) -> Artifact:
        """Store files + report under ``key`` atomically (temp dir, fsync, rename)."""
        staging = self.root / "tmp" / f"{key[:16]}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            for name, path in files.items():
                shutil.copyfile(path, staging / name)
            (staging / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
            for item in staging.iterdir():
                with item.open("rb") as handle:
                    os.fsync(handle.fileno())
            final = self._entry(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, final)
            except OSError:
                if not self.get(key):  # someone else stored it first: theirs is identical
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return Artifact(key, self._entry(key))

    def remember(self, slot: str, inputs: dict[str, Any]) -> None:
        """Record the inputs of the latest build of a (deployment, accelerator) for ``--explain``."""
        path = self.root / "index" / f"{slot}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as handle:
            handle.write(json.dumps(inputs, indent=2, sort_keys=True))
        os.replace(handle.name, path)

    def previous_inputs(self, slot: str) -> dict[str, Any] | None:
        path = self.root / "index" / f"{slot}.json"
        return json.loads(path.read_text()) if path.is_file() else None


class CandidateCache:
    """Quantized candidates of ``auto`` searches, by the digest of what made them (input model, mode and options,
    calibration data, versions): a rebuild after a changed goal, rollout or unrelated recipe field quantizes
    nothing again. Candidates are evaluated anew each time (the goal may differ); the newest ``keep`` stay."""

    def __init__(self, root: Path, keep: int = 24) -> None:
        self.root, self.keep = root, keep

    def get(self, key: str) -> tuple[Path, list[str]] | None:
        entry = self.root / key
        if not (entry / MODEL_FILE).is_file() or not (entry / "notes.json").is_file():
            return None
        os.utime(entry)  # recently used: kept longest
        return entry / MODEL_FILE, list(json.loads((entry / "notes.json").read_text()))

    def put(self, key: str, model: Path, notes: list[str]) -> None:
        """Store atomically (a temp dir renamed into place), then drop the least recently used beyond ``keep``."""
        staging = self.root / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            shutil.copyfile(model, staging / MODEL_FILE)
            (staging / "notes.json").write_text(json.dumps(notes))
            try:
                os.rename(staging, self.root / key)
            except OSError:
                pass  # another build stored the same candidate first: identical
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        entries = sorted((e for e in self.root.iterdir() if not e.name.startswith(".tmp-")),
                         key=lambda e: e.stat().st_mtime, reverse=True)
        for old in entries[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)


def explain(previous: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """Why a build key differs from the last build of the same slot, one line per changed input."""
    if previous is None:
        return ["no earlier build of this deployment and accelerator in the cache"]
    lines = []
    for name in sorted(set(previous) | set(current)):
        before, after = previous.get(name), current.get(name)
        if before == after:
            continue
        if isinstance(before, str) and isinstance(after, str) and len(after) == 64:
            lines.append(f"{name} changed: {before[:12]} -> {after[:12]}")
        elif isinstance(before, dict) and isinstance(after, dict):
            keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            lines.append(f"{name} changed: " + ", ".join(f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in keys))
        else:
            lines.append(f"{name} changed: {json.dumps(before)} -> {json.dumps(after)}")
    return lines or ["inputs identical to the last build"]
