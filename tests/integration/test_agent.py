"""The on-device agent: runs without edgeops, measures real releases, reads power from fake sysfs trees."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from edgeops.agent import AGENT_FILE
from labkit.artifacts import agent_module, local_release

STDLIB_OK = set(sys.stdlib_module_names)

BLOCK_EDGEOPS = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "edgeops" or name.startswith("edgeops."):
            raise ImportError("edgeops is not installed on this device")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_agent(directory: Path, *args: str) -> tuple[int, dict]:
    """Run the shipped agent file from ``directory`` with any import of edgeops blocked."""
    agent = directory / "edgeops_agent.py"
    if not agent.exists():
        shutil.copyfile(AGENT_FILE, agent)
    done = subprocess.run([sys.executable, "-c", BLOCK_EDGEOPS, str(agent), *args], cwd=directory,
                          capture_output=True, text=True, timeout=120)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, (done.stdout, done.stderr)
    return done.returncode, json.loads(lines[0])


def test_agent_imports_only_stdlib_numpy_and_onnxruntime() -> None:
    tree = ast.parse(AGENT_FILE.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported - STDLIB_OK <= {"numpy", "onnxruntime", "onnxruntime_genai"}  # the last only where a
    # decoder's profile generates with it, imported when such a release is measured


@pytest.mark.parametrize("deployment,device", [("wearable-activity", "lab-01"), ("meter-digits", "cam-depot-01"),
                                               ("vehicle-assistant", "van-0042")])
def test_agent_benchmarks_example_releases_without_edgeops(repo_copy: Path, tmp_path: Path,
                                                           deployment: str, device: str) -> None:
    release = local_release(repo_copy, deployment, device, tmp_path / "release")
    code, doc = run_agent(tmp_path, "bench", str(tmp_path / "release"), "--runs", "60", "--golden")
    assert code == 0 and doc["ok"], doc
    assert doc["schema"] == "edgeops.agent/v1"
    a = doc["a"]
    assert a["model_sha256"] == release.artifact_sha256
    assert a["providers"] == ["CPUExecutionProvider"]
    latency = a["latency"]
    assert latency["runs"] == len(a["samples_ms"]) == 60
    assert 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["p95_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    assert latency["throughput_per_s"] > 0 and doc["peak_rss_mb"] > 0
    golden = a["golden"]
    shipped = len(np.load(tmp_path / "release" / "golden.npz")["expected"])
    assert golden["samples"] == shipped >= 32 and golden["max_abs_deviation_from_build"] < 1e-4
    if golden["metric"] == "cosine":
        assert golden["value"] > 0.95
    else:
        assert golden["value"] > 90


@pytest.mark.parametrize("runtime", ["onnxruntime-genai", "onnxruntime"])
def test_agent_measures_a_decoder_in_tokens_and_scores_it_as_the_build_did(repo_copy: Path, tmp_path: Path,
                                                                          runtime: str) -> None:
    from edgeops.manifest.workspace import load_workspace
    from edgeops.verify import host_golden_value

    release = local_release(repo_copy, "assistant-lm", "lab-01", tmp_path / "release")
    config_path = tmp_path / "release" / "runtime.json"
    config = json.loads(config_path.read_text())
    assert config["generation"]["runtime"] == "onnxruntime-genai"  # what the lab-cpu profile asks
    config["generation"]["runtime"] = runtime
    config_path.write_text(json.dumps(config))
    assert {"tokenizer.json", "genai_config.json"} <= {f.name for f in release.files}
    code, doc = run_agent(tmp_path, "bench", str(tmp_path / "release"), "--runs", "64", "--golden")
    assert code == 0 and doc["ok"], doc
    a = doc["a"]
    assert a["generation"]["runtime"].startswith(runtime + " ")
    assert doc["block"] == config["generation"]["decode_tokens"] == 32  # a block is one generation
    assert len(a["samples_ms"]) == 64 and len(a["generation"]["ttft_samples_ms"]) == 2  # 2 generations of 32
    assert a["generation"]["prompt_tokens"] == 64 and a["latency"]["p50_ms"] > 0
    golden = np.load(tmp_path / "release" / "golden.npz")
    goal = load_workspace(repo_copy).deployments["assistant-lm"].obj.spec.quality
    host = host_golden_value(dict(golden), goal)
    one_token = 100 / int((golden["reference"] >= 0).sum())
    assert abs(a["golden"]["value"] - host) <= one_token  # the device scores with the build's own decoder
    assert a["golden"]["metric"] == "agreement" and a["golden"]["perplexity"] < 259 / 4


def test_compare_interleaves_two_releases_and_returns_raw_samples(repo_copy: Path, tmp_path: Path) -> None:
    local_release(repo_copy, "wearable-activity", "lab-01", tmp_path / "new")
    local_release(repo_copy, "meter-digits", "cam-depot-01", tmp_path / "old")
    code, doc = run_agent(tmp_path, "bench", str(tmp_path / "new"), "--compare", str(tmp_path / "old"),
                          "--runs", "40", "--block", "10", "--warmup", "5")
    assert code == 0 and doc["mode"] == "compare"
    assert len(doc["a"]["samples_ms"]) == len(doc["b"]["samples_ms"]) == 40
    assert doc["a"]["model_sha256"] != doc["b"]["model_sha256"]


def test_duration_mode_runs_for_the_given_time(repo_copy: Path, tmp_path: Path) -> None:
    local_release(repo_copy, "wearable-activity", "lab-01", tmp_path / "r")
    started = time.perf_counter()
    code, doc = run_agent(tmp_path, "bench", str(tmp_path / "r"), "--duration", "0.5")
    assert code == 0 and doc["a"]["latency"]["runs"] > 10
    assert time.perf_counter() - started >= 0.5


def test_unavailable_provider_is_a_failure_not_a_fallback(repo_copy: Path, tmp_path: Path) -> None:
    local_release(repo_copy, "meter-digits", "cam-plant-a-01", tmp_path / "gpu")  # TensorRT + CUDA profile
    code, doc = run_agent(tmp_path, "bench", str(tmp_path / "gpu"), "--runs", "5")
    assert code == 3 and doc["ok"] is False
    assert doc["error"] == "provider-unavailable"
    assert "TensorrtExecutionProvider" in doc["message"] and "CPUExecutionProvider" in doc["message"]


def test_nodes_on_the_cpu_fail_a_release_that_requires_its_accelerator(repo_copy: Path, tmp_path: Path) -> None:
    release = tmp_path / "r"
    local_release(repo_copy, "wearable-activity", "lab-01", release)
    config = json.loads((release / "runtime.json").read_text())
    config["require_accelerator"] = True  # what an accelerator release says; here every node runs on the CPU
    (release / "runtime.json").write_text(json.dumps(config))
    code, doc = run_agent(tmp_path, "bench", str(release), "--runs", "5")
    assert code == 3 and doc["error"] == "cpu-fallback"
    assert "fell back to the CPU" in doc["message"]


def test_errors_are_json_too(tmp_path: Path) -> None:
    code, doc = run_agent(tmp_path, "bench", str(tmp_path / "missing"))
    assert code == 3 and doc["ok"] is False and "runtime.json" in doc["message"]


# ------------------------------------------------------------------ power readers on fake sysfs trees


def meter(config: dict):
    return agent_module().EnergyMeter({"interval_ms": 10, **config})


def write(path: Path, value: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")


def test_rapl_counter_with_wrap_around(tmp_path: Path) -> None:
    zone = tmp_path / "sys/class/powercap/intel-rapl:0"
    write(zone / "max_energy_range_uj", 1_000_000)
    write(zone / "energy_uj", 999_000)
    m = meter({"source": "rapl", "boundary": "package", "path": "/sys/class/powercap/intel-rapl:0",
               "sysfs_root": str(tmp_path)}).start()
    write(zone / "energy_uj", 2_000)  # wrapped: 1000 uJ to the top, then 2000 more
    assert m.energy_mj() == pytest.approx(3.0)
    write(zone / "energy_uj", 5_000)
    assert m.energy_mj() == pytest.approx(6.0)
    assert m.describe()["boundary"] == "package"


def test_hwmon_energy_counter(tmp_path: Path) -> None:
    write(tmp_path / "hwmon1/energy1_input", 10_000)
    m = meter({"source": "hwmon", "boundary": "board", "path": str(tmp_path / "hwmon1/energy1_input")}).start()
    write(tmp_path / "hwmon1/energy1_input", 35_000)
    assert m.energy_mj() == pytest.approx(25.0)


def test_hwmon_power_is_sampled_and_integrated(tmp_path: Path) -> None:
    write(tmp_path / "hwmon0/power1_input", 2_000_000)  # 2 W in microwatts
    m = meter({"source": "hwmon", "boundary": "board", "path": str(tmp_path / "hwmon0/power1_input")}).start()
    time.sleep(0.2)
    energy = m.energy_mj()
    m.stop()
    assert energy == pytest.approx(2000 * 0.2, rel=0.25)  # 2000 mW for 0.2 s
    assert m.describe()["samples"] >= 3


@pytest.mark.parametrize("layout", ["power", "voltage-current"])
def test_ina3221_rail(tmp_path: Path, layout: str) -> None:
    rail = tmp_path / "ina3221/hwmon3"
    if layout == "power":
        write(rail / "in_power0_input", 1500)  # mW on channel 1
    else:
        write(rail / "in1_input", 5000)         # mV
        write(rail / "curr1_input", 300)        # mA -> 1500 mW
    m = meter({"source": "ina3221", "boundary": "module", "path": str(rail), "channel": 1}).start()
    time.sleep(0.1)
    energy = m.energy_mj()
    m.stop()
    assert energy == pytest.approx(1500 * 0.1, rel=0.3)


def test_external_command_prints_milliwatts(tmp_path: Path) -> None:
    m = meter({"source": "command", "boundary": "board", "argv": [sys.executable, "-c", "print(750)"]}).start()
    time.sleep(0.1)
    energy = m.energy_mj()
    m.stop()
    assert energy == pytest.approx(750 * 0.1, rel=0.5)


def test_reading_facts_never_runs_a_command_sensor(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    sensor = {"source": "command", "boundary": "board",
              "argv": [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x'); print(750)"]}
    facts = agent_module().gather_facts(str(tmp_path / "root"), sensor)
    assert not marker.exists() and "not_run" in facts["power_sensor"]  # what a pull request's plan does


def test_estimate_from_cpu_time() -> None:
    m = meter({"source": "estimate", "boundary": "estimate", "active_mw_per_core": 1000, "idle_mw": 0}).start()
    end = time.process_time() + 0.1
    while time.process_time() < end:
        pass
    assert m.energy_mj() == pytest.approx(100, rel=0.3)  # 0.1 s of one busy core at 1000 mW


def test_missing_power_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(agent_module().AgentError, match="does not exist"):
        meter({"source": "hwmon", "boundary": "board", "path": str(tmp_path / "nope/power1_input")}).start()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_unreadable_rapl_counter_says_so() -> None:
    tmp_path = Path(tempfile.mkdtemp(prefix="edgeops-rapl-", dir="/tmp"))  # traversable by 'nobody'
    zone = tmp_path / "rapl"
    write(zone / "max_energy_range_uj", 1_000_000)
    write(zone / "energy_uj", 5)
    os.chmod(zone / "energy_uj", 0o400)
    for directory in (tmp_path, zone):
        os.chmod(directory, 0o755)
    read, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child becomes 'nobody', like an agent run by an unprivileged user
        os.close(read)
        try:
            os.setgid(65534)
            os.setuid(65534)
            meter({"source": "rapl", "boundary": "package", "path": str(zone)}).start()
            message = "read it"
        except Exception as exc:  # noqa: BLE001
            message = str(exc)
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    message = os.read(read, 4096).decode()
    shutil.rmtree(tmp_path)
    assert "cannot read energy counter" in message and "as uid 65534" in message
    assert "root only" in message


def test_runtime_facts_are_kept_under_the_installed_files_fingerprint(tmp_path: Path) -> None:
    import onnxruntime

    root = tmp_path / "root"
    read = ("state", "--root", str(root), "--deployment", "d", "--facts", "--power", '{"source": "none"}')
    args = (*read, "--keep")  # a mutating command's refresh keeps them; a read writes nothing
    _, fresh = run_agent(tmp_path, *args)
    assert not (root / "agent" / "runtime-facts.json").exists()  # a device without a root gets nothing written
    (root / "agent").mkdir(parents=True)
    run_agent(tmp_path, *read)
    assert not (root / "agent" / "runtime-facts.json").exists()  # nor does a read
    _, first = run_agent(tmp_path, *args)
    cache = root / "agent" / "runtime-facts.json"
    kept = json.loads(cache.read_text())
    assert kept["facts"]["onnxruntime"]["version"] == onnxruntime.__version__ == first["facts"]["onnxruntime"]["version"]
    assert first["facts"]["onnxruntime"] == fresh["facts"]["onnxruntime"]
    kept["facts"]["onnxruntime"]["version"] = "9.9.9"  # what an answer from the cache would show
    cache.write_text(json.dumps(kept))
    assert run_agent(tmp_path, *args)[1]["facts"]["onnxruntime"]["version"] == "9.9.9"
    kept["fingerprint"] = "another installation"  # an upgrade changes the installed files: asked again
    cache.write_text(json.dumps(kept))
    assert run_agent(tmp_path, *args)[1]["facts"]["onnxruntime"]["version"] == onnxruntime.__version__
    cache.write_text("{not json")
    assert run_agent(tmp_path, *args)[1]["facts"]["onnxruntime"]["version"] == onnxruntime.__version__
