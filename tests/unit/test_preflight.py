"""The preflight as a pure decision: facts + needs -> refusals that name device, what is missing and the line."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edgeops.facts import DeviceFacts, DeviceNeeds, preflight

NEEDS = DeviceNeeds(python="/usr/bin/python3", python_at="device_profiles/x.yaml:25",
                    providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
                    providers_at="device_profiles/x.yaml:9", power_needed=False, power_at="device_profiles/x.yaml:18",
                    root="/opt/edgeops", root_at="device_profiles/x.yaml:26")
GOOD = DeviceFacts(python_executable="/usr/bin/python3", python_version="3.11.2", machine="aarch64",
                   numpy_version="1.26.4", onnxruntime_version="1.18.0",
                   providers=("CUDAExecutionProvider", "CPUExecutionProvider"), free_bytes=500_000_000,
                   power_source="hwmon", power_readable=True)


def test_a_device_with_everything_passes() -> None:
    assert preflight("cam-01", GOOD, NEEDS, 10_000_000).refusals == ()


def test_missing_onnxruntime_names_device_interpreter_and_profile_line() -> None:
    facts = replace(GOOD, onnxruntime_version=None, providers=(),
                    onnxruntime_error="ModuleNotFoundError: No module named 'onnxruntime'")
    assert preflight("lab-01", facts, NEEDS, 0).refusals == (
        "lab-01: /usr/bin/python3 has no onnxruntime: install onnxruntime on the device or set device.python "
        "(device_profiles/x.yaml:25)",)


def test_interpreter_found_through_path_is_shown_with_its_real_location() -> None:
    facts = replace(GOOD, python_executable="/root/.pyenv/versions/3.11.7/bin/python3", numpy_version=None)
    needs = replace(NEEDS, python="python3")
    [refusal] = preflight("lab-01", facts, needs, 0).refusals
    assert refusal.startswith("lab-01: python3 (/root/.pyenv/versions/3.11.7/bin/python3) has no numpy")


def test_missing_execution_provider_is_refused_with_the_package_to_install() -> None:
    facts = replace(GOOD, providers=("CPUExecutionProvider",))
    [refusal] = preflight("cam-01", facts, NEEDS, 0).refusals
    assert "lacks CUDAExecutionProvider (available: CPUExecutionProvider)" in refusal
    assert "onnxruntime-gpu" in refusal and refusal.endswith("(device_profiles/x.yaml:9)")


def test_not_enough_space_for_the_bytes_to_move() -> None:
    facts = replace(GOOD, free_bytes=3_000_000)
    assert preflight("cam-01", facts, NEEDS, 1_000_000).ok  # 1 MB + 1 MiB margin fits in 3 MB
    [refusal] = preflight("cam-01", facts, NEEDS, 2_500_000).refusals
    assert refusal.startswith("cam-01: 3.0 MB free under /opt/edgeops but the release needs 3.5 MB")
    assert not preflight("cam-01", facts, NEEDS, 1_000_000, release_bytes=1_000_000).ok  # its copies count too
    assert preflight("cam-01", facts, NEEDS, 0).ok  # nothing to move: a full disk does not block a re-verify


def test_disk_budget_counts_what_is_there_and_what_comes() -> None:
    needs = replace(NEEDS, disk_budget_bytes=20_000_000, disk_budget_at="device_profiles/x.yaml:30")
    facts = replace(GOOD, used_bytes=15_000_000)
    assert preflight("gw-1", facts, needs, 2_000_000, release_bytes=2_000_000).ok
    [refusal] = preflight("gw-1", facts, needs, 3_000_000, release_bytes=3_000_000).refusals
    assert refusal == ("gw-1: edgeops would use 21.0 MB under /opt/edgeops, over its disk_budget_mb of 20.0 MB: "
                       "raise device.disk_budget_mb or lower keep_releases (device_profiles/x.yaml:30)")


@pytest.mark.parametrize("version, ok", [("3.7.3", False), ("3.8.0", True), ("3.13.0rc1", True), ("2.7.18", False)])
def test_python_version_floor(version: str, ok: bool) -> None:
    assert preflight("d", replace(GOOD, python_version=version), NEEDS, 0).ok is ok


def test_an_interpreter_that_cannot_run_the_agent_is_one_refusal() -> None:
    facts = DeviceFacts.unusable_python("exit 127: bash: line 1: /opt/py/bin/python3: No such file or directory")
    [refusal] = preflight("gw-3", facts, NEEDS, 0).refusals
    assert refusal.startswith("gw-3: /usr/bin/python3 cannot run the agent (exit 127: bash: line 1:")
    assert refusal.endswith("set device.python (device_profiles/x.yaml:25)")


def test_unreadable_power_sensor_refuses_only_when_an_slo_needs_it() -> None:
    facts = replace(GOOD, power_readable=False, power_error="cannot read energy counter as uid 1000")
    relaxed = preflight("w-1", facts, NEEDS, 0)
    assert relaxed.ok and "energy will not be measured" in relaxed.warnings[0]
    strict = preflight("w-1", facts, replace(NEEDS, power_needed=True), 0)
    assert "fix power.sensor (device_profiles/x.yaml:18)" in strict.refusals[0]


def test_an_older_onnxruntime_than_the_build_host_is_a_warning() -> None:
    checked = preflight("d", GOOD, NEEDS, 0, build_onnxruntime="1.20.1")
    assert checked.ok and "older than 1.20.1 on the build host" in checked.warnings[0]
    assert preflight("d", GOOD, NEEDS, 0, build_onnxruntime="1.18.3").warnings == ()


def test_facts_from_the_agent_document() -> None:
    doc = {"python": {"executable": "/x/bin/python3", "version": "3.12.1"}, "machine": "armv7l",
           "numpy": {"version": "1.26.0", "error": None},
           "onnxruntime": {"version": None, "error": "ImportError: libgomp.so.1", "available_providers": []},
           "disk": {"free_bytes": 1234}, "power_sensor": {"source": "rapl", "readable": False, "error": "EACCES"}}
    facts = DeviceFacts.from_agent(doc)
    assert (facts.python_executable, facts.machine, facts.onnxruntime_version, facts.free_bytes) == \
        ("/x/bin/python3", "armv7l", None, 1234)
    [refusal] = preflight("d", facts, NEEDS, 0).refusals
    assert "has no onnxruntime (ImportError: libgomp.so.1)" in refusal  # a broken install says why


def test_a_root_the_ssh_user_cannot_write_is_refused() -> None:
    [refusal] = preflight("cam-01", replace(GOOD, root_writable=False, uid=1000), NEEDS, 0).refusals
    assert refusal == ("cam-01: /opt/edgeops cannot be written (or created) by the SSH user (uid 1000): give that "
                       "user the directory or set device.root (device_profiles/x.yaml:26)")


def test_a_fleet_that_signs_releases_refuses_devices_not_enrolled_with_its_trust_root() -> None:
    needs = replace(NEEDS, signers_sha256="a" * 64, signers_at="manifests/fleets/x.yaml:12",
                    enroll_command="edgeops enroll x")
    bare = preflight("d1", replace(GOOD, enrolled=False), needs, 0)
    assert bare.refusals == ("d1: is not enrolled for signed releases (trust.allowed_signers, "
                             "manifests/fleets/x.yaml:12): run edgeops enroll x (a device that trusts a key takes a "
                             "new file only signed by it)",)
    other = preflight("d1", replace(GOOD, enrolled=True, signers_sha256="b" * 64), needs, 0)
    assert "trusts another allowed-signers file" in other.refusals[0]
    assert preflight("d1", replace(GOOD, enrolled=True, signers_sha256="a" * 64), needs, 0).ok
    assert preflight("d1", replace(GOOD, enrolled=False), NEEDS, 0).ok  # a fleet that does not sign


GENERATES = replace(NEEDS, genai_version="0.18.0", genai_at="device_profiles/x.yaml:30",
                    memory_bytes=300 * 2**20, memory_limit_mb=512, memory_at="device_profiles/x.yaml:12")


def test_a_decoder_needs_the_generation_runtime_its_profile_names() -> None:
    refused = preflight("gw-01", GOOD, GENERATES, 0).refusals
    assert len(refused) == 1 and "has no onnxruntime-genai" in refused[0]
    assert "onnxruntime-genai==0.18.0" in refused[0] and "device_profiles/x.yaml:30" in refused[0]
    assert preflight("gw-01", replace(GOOD, genai_version="0.18.1"), GENERATES, 0).refusals == ()
    other = preflight("gw-01", replace(GOOD, genai_version="0.12.0"), GENERATES, 0).refusals
    assert len(other) == 1 and "0.12.0 on the device, 0.18.0 wanted" in other[0]


def test_a_decoder_and_its_kv_cache_must_fit_the_memory() -> None:
    facts = replace(GOOD, genai_version="0.18.0", memory_total_mb=4096)
    over_limit = preflight("gw-01", facts, replace(GENERATES, memory_limit_mb=256), 0).refusals
    assert len(over_limit) == 1 and "need 300.0 MB, over the profile's limits.max_memory_mb 256" in over_limit[0]
    small_device = preflight("gw-01", replace(facts, memory_total_mb=200), replace(GENERATES, memory_limit_mb=None),
                             0).refusals
    assert len(small_device) == 1 and "the device has 200 MB" in small_device[0]
    assert preflight("gw-01", facts, GENERATES, 0).refusals == ()
