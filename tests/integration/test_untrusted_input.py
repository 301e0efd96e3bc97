"""A pull request's files are untrusted input: no reading outside the repository, no code, no YAML bombs.

Each case is a located error with exit 3 from `validate` and `plan` (what the PR workflow runs), before any
device is dialled or anything is built.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgeops.cli import main
from edgeops.errors import ExitCode

MANIFEST = "manifests/wearable.yaml"


def edgeops(root: Path, *args: str, allow_code: bool = False) -> Result:
    env = {"EDGEOPS_ALLOW_CODE": "1" if allow_code else ""}
    return CliRunner(env=env).invoke(main, [*args, "--root", str(root)])


def rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


def assert_refused(root: Path, manifest: str, *needles: str) -> None:
    for command in ("validate", "plan"):
        result = edgeops(root, command, str(root / manifest))
        assert result.exit_code == ExitCode.INVALID, (command, result.output)
        assert "Traceback" not in result.output
        for needle in needles:
            assert needle in result.output, (command, needle, result.output)
    assert not (root / ".edgeops" / "cache").exists()  # nothing was built


@pytest.mark.parametrize("path", ["/etc/passwd", "../../../../../../etc/passwd"])
def test_a_model_path_outside_the_repository_is_refused(repo_copy: Path, path: str) -> None:
    rewrite(repo_copy / MANIFEST, "path: ../examples/models/wearable_cnn.onnx", f"path: {path}")
    assert_refused(repo_copy, MANIFEST, "wearable.yaml:9: spec.model.path:", "resolves outside the repository")


def test_a_symlink_out_of_the_repository_is_refused(repo_copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.npz"
    outside.write_bytes(b"not yours")
    os.symlink(outside, repo_copy / "examples" / "data" / "linked.npz")
    rewrite(repo_copy / MANIFEST, "calibration: ../examples/data/wearable_calibration.npz",
            "calibration: ../examples/data/linked.npz")
    assert_refused(repo_copy, MANIFEST, "spec.data.calibration:", "resolves outside the repository")


def test_known_hosts_outside_the_repository_is_refused(repo_copy: Path) -> None:
    fleet = repo_copy / "manifests" / "fleets" / "lab.yaml"
    rewrite(fleet, "known_hosts: ../../.edgeops/lab/known_hosts", "known_hosts: ~/.bashrc")
    assert_refused(repo_copy, MANIFEST, "lab.yaml", "spec.ssh.known_hosts:", "resolves outside the repository")


def test_a_student_factory_is_code_and_refused_unless_the_runner_allows_code(repo_copy: Path) -> None:
    rewrite(repo_copy / MANIFEST, "  recipe:\n", "  recipe:\n    - distill: {student: {factory: 'os:system'}}\n")
    assert_refused(repo_copy, MANIFEST, "spec.recipe[0].distill.student.factory:", "EDGEOPS_ALLOW_CODE=1")
    allowed = edgeops(repo_copy, "validate", str(repo_copy / MANIFEST), allow_code=True)
    assert "student.factory" not in allowed.output


BOMB = "".join(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
               for prev, name in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("body,needle", [
    ("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + BOMB, "expands to more than 100,000 values"),
    ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 64 levels"),
    ("x: [" + ", ".join(["*a"] * 101) + "]\n", "more than 100 YAML aliases"),
    ("x: '" + "y" * 1_100_000 + "'\n", "a manifest may be at most 1,000,000"),
])
def test_a_yaml_bomb_is_a_located_error_and_the_other_manifests_still_work(repo_copy: Path, body: str,
                                                                             needle: str) -> None:
    bomb = repo_copy / "manifests" / "bomb.yaml"
    bomb.write_text("apiVersion: edgeops/v1\nkind: Deployment\n" + body.replace("x: [*a", "a: &a 1\nx: [*a", 1))
    result = edgeops(repo_copy, "validate", str(bomb))
    assert result.exit_code == ExitCode.INVALID and needle in result.output and "Traceback" not in result.output
    assert "bomb.yaml" in result.output
    assert edgeops(repo_copy, "validate", str(repo_copy / MANIFEST)).exit_code == ExitCode.OK
