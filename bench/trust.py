"""What the trust boundary costs: signing a release, verifying it on a device, refusing hostile YAML.

    python bench/trust.py [--repeat 20]

Signing runs `ssh-keygen -Y sign` on this machine (once per release per apply, whatever the number of
devices); verifying runs on each device at activation, with `ssh-keygen -Y verify` or, on devices without
OpenSSH, the agent's built-in Ed25519 verifier. Then `edgeops validate` on pull-request inputs that once
took 70 s and a MemoryError (an alias bomb) or a RecursionError (deep nesting), end to end.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine, markdown_table  # noqa: E402

from edgeops.signing import (  # noqa: E402
    RELEASE_NAMESPACE,
    FileDigest,
    allowed_signers_line,
    generate_key,
    release_metadata,
    sign,
)
from labkit.artifacts import agent_module  # noqa: E402
from labkit.repo import copy_repo  # noqa: E402


def timed(repeat: int, work) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), max(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    agent = agent_module()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "release"
        generate_key(key, "bench")
        allowed = Path(tmp) / "allowed_signers"
        allowed.write_text(allowed_signers_line(Path(str(key) + ".pub").read_text()))
        files = [FileDigest("model.onnx", "a" * 64, 5_000_000), FileDigest("golden.npz", "b" * 64, 40_000),
                 FileDigest("runtime.json", "c" * 64, 600), FileDigest("release.json", "d" * 64, 300)]
        data = release_metadata("wearable-activity", "r-0123456789abcdef", files, "e" * 64, 1, 3600)
        signature = sign(key, RELEASE_NAMESPACE, data)
        rows.append(["sign (controller, ssh-keygen -Y sign)", "once per release", len(data),
                     *(f"{v:.1f}" for v in timed(args.repeat, lambda: sign(key, RELEASE_NAMESPACE, data)))])
        for tool, label in ((None, "verify (device, ssh-keygen -Y verify)"),
                            ("", "verify (device, built-in Ed25519, no OpenSSH)")):
            rows.append([label, "once per device", len(data), *(f"{v:.1f}" for v in timed(
                args.repeat, lambda: agent.verify_signature(str(allowed), RELEASE_NAMESPACE, data, signature,
                                                            tool=tool)))])

        root = copy_repo(Path(tmp) / "repo")
        bomb = "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
        hostile = {
            "alias bomb (9 levels of 9 aliases)": "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + bomb,
            "nesting 5000 deep": "x: " + "[" * 5000 + "]" * 5000 + "\n",
            "model path /etc/passwd": None,
        }
        edgeops = Path(sys.executable).parent / "edgeops"
        yaml_rows = []
        for label, body in hostile.items():
            if body is None:
                manifest = root / "manifests" / "wearable.yaml"
                manifest.write_text(manifest.read_text().replace("path: ../examples/models/wearable_cnn.onnx",
                                                                 "path: /etc/passwd"))
            else:
                manifest = root / "manifests" / "hostile.yaml"
                manifest.write_text("apiVersion: edgeops/v1\nkind: Deployment\n" + body)
            started = time.perf_counter()
            done = subprocess.run([str(edgeops), "validate", str(manifest), "--root", str(root)],
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - started
            first = (done.stderr.strip().splitlines() or [""])[0]
            yaml_rows.append([label, done.returncode, f"{seconds:.2f}", first.split(": ", 2)[-1][:70]])
            if body is not None:
                manifest.unlink()
        started = time.perf_counter()
        subprocess.run([str(edgeops), "--version"], capture_output=True, check=True)
        startup = time.perf_counter() - started
    print(f"Machine: {machine()}; {args.repeat} repeats, median and max\n")
    print(markdown_table(["step", "how often", "metadata bytes", "median ms", "max ms"], rows))
    print(f"\n`edgeops validate FILE` on hostile pull-request input, end to end (process start "
          f"{startup:.2f} s of it):\n")
    print(markdown_table(["input", "exit", "wall s", "error"], yaml_rows))


if __name__ == "__main__":
    main()
