"""A repository copy whose lab fleet has two hardware classes and a deployment that decides on the device
(quantize auto, decide_on: device): shared by tests/e2e/test_decide_ssh.py and bench/decide.py."""

from __future__ import annotations

from pathlib import Path

from labkit.repo import free_ports, write_lab_fleet

DECIDE_DEPLOYMENT = "digits-decide"


def write_two_class_repo(root: Path, devices: Path, finalists: int = 2, runs: int = 100) -> str:
    """lab-01 in class lab-x86 (the lab profile: 1 thread) and lab-02 in lab-x86-2t (2 threads); the digits
    CNN deployed to both with ``quantize: {mode: auto, decide_on: device}``; returns the manifest's path
    relative to ``root``."""
    profile = (root / "device_profiles" / "lab-cpu.yaml").read_text()
    (root / "device_profiles" / "lab-cpu-2t.yaml").write_text(
        profile.replace("name: lab-cpu", "name: lab-cpu-2t").replace("hardware_class: lab-x86",
                                                                      "hardware_class: lab-x86-2t")
        .replace("intra_op_num_threads: 1", "intra_op_num_threads: 2"))
    port = free_ports(1)[0]
    write_lab_fleet(root, 1, devices, extra_device=f"    - {{name: lab-02, host: 127.0.0.1, port: {port}, root: "
                                                   f"{devices / 'lab-02'}, profile: lab-cpu-2t}}")
    camera = (root / "manifests" / "camera.yaml").read_text()
    text = camera[:camera.index("  recipe_for:")] + camera[camera.index("  quality:"):camera.index("  targets:")]
    text = (text.replace("name: meter-digits", f"name: {DECIDE_DEPLOYMENT}")
            .replace("    - quantize: {mode: auto}",
                     f"    - quantize: {{mode: auto, decide_on: device, finalists: {finalists}}}")
            .replace("latency_p95_ms: 10", "latency_p95_ms: 500"))  # what is chosen, not how fast the host is
    manifest = f"manifests/{DECIDE_DEPLOYMENT}.yaml"
    (root / manifest).write_text(text + "  targets:\n    - fleet: lab\n  rollout:\n    waves: [1, 100%]\n"
                                        f"    verification: {{runs: {runs}}}\n")
    return manifest
