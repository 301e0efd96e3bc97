"""Distillation with PyTorch (the distill extra; .ci/run installs torch so these run in CI)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import main
from edgeops.manifest.workspace import load_workspace
from labkit.artifacts import build_for

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")


def with_recipe(root: Path, recipe: str, max_drop: str = "1.5", training: str = "digits_training.npz") -> None:
    path = root / "manifests" / "camera.yaml"
    text = path.read_text().replace("  recipe:\n    - quantize: {mode: auto}\n", f"  recipe:\n{recipe}")
    text = text.replace("training: ../examples/data/digits_training.npz", f"training: ../examples/data/{training}")
    path.write_text(text.replace("max_drop: 0.5", f"max_drop: {max_drop}"))


def build_camera(root: Path):
    ws = load_workspace(root)
    return build_for(ws, "meter-digits", "cpu", force=True)


STUDENT = "    - distill: {student: {family: cnn2d, width: 16, depth: 2}, epochs: 40, seed: 7}\n"


def test_cnn_student_is_10x_smaller_within_1_5_points(repo_copy: Path) -> None:
    with_recipe(repo_copy, STUDENT)
    report = build_camera(repo_copy).report
    teacher, student = report["stages"][0], report["stages"][1]
    assert teacher["size_bytes"] / student["size_bytes"] >= 10
    assert teacher["quality"]["value"] - student["quality"]["value"] <= 1.5
    assert student["distill"]["student_parameters"] < teacher["parameters"] / 10
    assert "soft targets + hard labels" in student["notes"][0]


def test_same_seed_same_student_and_the_seed_is_in_the_cache_key(repo_copy: Path) -> None:
    with_recipe(repo_copy, STUDENT)
    first, second = build_camera(repo_copy), build_camera(repo_copy)
    assert first.artifact.model_sha256 == second.artifact.model_sha256
    manifest = repo_copy / "manifests" / "camera.yaml"
    manifest.write_text(manifest.read_text().replace("seed: 7", "seed: 8"))
    third = build_camera(repo_copy)
    assert third.artifact.key != first.artifact.key
    assert third.artifact.model_sha256 != first.artifact.model_sha256


def test_no_labels_means_pure_soft_target_distillation(repo_copy: Path) -> None:
    import numpy as np

    data = repo_copy / "examples" / "data"
    np.savez(data / "digits_unlabelled.npz", image=np.load(data / "digits_training.npz")["image"])
    with_recipe(repo_copy, STUDENT, max_drop="2", training="digits_unlabelled.npz")
    report = build_camera(repo_copy).report
    student = report["stages"][1]
    assert "soft targets only (no labels)" in student["notes"][0]
    assert student["quality"]["passed"]


def test_prune_then_distill_fine_tune_recovers_accuracy(repo_copy: Path) -> None:
    with_recipe(repo_copy, "    - prune: {method: structured, sparsity: 0.8}\n"
                           "    - distill: {student: {previous_step: true}, epochs: 15, learning_rate: 0.001}\n"
                           "    - quantize: {mode: static}\n")
    report = build_camera(repo_copy).report
    original, pruned, tuned, quantized = report["stages"]
    assert pruned["quality"]["value"] < original["quality"]["value"] - 3  # pruning alone hurts...
    assert not pruned["quality"]["passed"] and "the gate applies after it" in pruned["notes"][-1]
    assert original["quality"]["value"] - tuned["quality"]["value"] <= 1.5  # the fine-tune recovers it
    assert tuned["parameters"] == pruned["parameters"]
    assert quantized["size_bytes"] < original["size_bytes"] / 10


def test_distill_without_torch_fails_validation_with_the_install_hint(repo_copy: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with_recipe(repo_copy, STUDENT)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    monkeypatch.chdir(repo_copy)
    result = CliRunner().invoke(main, ["validate", "manifests"])
    assert result.exit_code == 3
    assert "spec.recipe[0].distill: distillation needs PyTorch" in result.stderr
    assert "pip install 'edgeops[distill]'" in result.stderr


def test_a_user_supplied_onnx_student_is_trained(repo_copy: Path) -> None:
    import onnx

    from edgeops.compress.prune import structured

    student = onnx.load(str(repo_copy / "examples/models/digits_cnn.onnx"))
    structured(student, 0.9)  # any small ONNX model with the teacher's interface will do
    onnx.save(student, str(repo_copy / "examples/models/student.onnx"))
    with_recipe(repo_copy, "    - distill: {student: {onnx: ../examples/models/student.onnx}, epochs: 20}\n")
    report = build_camera(repo_copy).report
    trained = report["stages"][1]
    assert "user-supplied student" in trained["notes"][0]
    assert trained["quality"]["passed"] and trained["parameters"] < report["stages"][0]["parameters"] / 10
