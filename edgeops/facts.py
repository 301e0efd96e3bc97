"""Device facts and the preflight: can this device run the release, decided before any byte moves.

Facts are what the agent reports about a device (interpreter, numpy, onnxruntime and its
execution providers, architecture, free space under the root, the power sensor). The
preflight is pure: facts + what the profile and deployment need -> reasons to refuse
(each naming the device, what is missing and the profile line to change) and warnings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MIN_PYTHON = (3, 8)
DISK_MARGIN_BYTES = 1 << 20  # room for state.json and logs beside the release files


@dataclass(frozen=True)
class DeviceFacts:
    """What one device has, as its agent read it (or why the agent could not run at all)."""

    python_error: str | None = None          # the interpreter could not run the agent
    python_executable: str | None = None
    python_version: str | None = None
    machine: str | None = None
    system: str | None = None
    kernel: str | None = None
    hostname: str | None = None
    cpus: int | None = None
    memory_total_mb: float | None = None
    uid: int | None = None
    numpy_version: str | None = None
    numpy_error: str | None = None
    onnxruntime_version: str | None = None
    onnxruntime_error: str | None = None
    providers: tuple[str, ...] = ()
    genai_version: str | None = None          # onnxruntime-genai, where installed (generation profiles need it)
    genai_error: str | None = None
    free_bytes: int | None = None
    used_bytes: int | None = None            # what edgeops keeps under the device root
    root_writable: bool | None = None        # the root, or the directory it will be created in
    power_source: str = "none"
    power_readable: bool | None = None
    power_error: str | None = None
    enrolled: bool | None = None             # has a trust root (allowed signers) for signed releases
    signers_sha256: str | None = None

    @classmethod
    def from_agent(cls, doc: dict[str, Any]) -> DeviceFacts:
        python, ort, numpy = doc.get("python") or {}, doc.get("onnxruntime") or {}, doc.get("numpy") or {}
        disk, power, trust = doc.get("disk") or {}, doc.get("power_sensor") or {}, doc.get("trust") or {}
        return cls(python_executable=python.get("executable"), python_version=python.get("version"),
                   machine=doc.get("machine"), system=doc.get("system"), kernel=doc.get("kernel"),
                   hostname=doc.get("hostname"), cpus=doc.get("cpus"), memory_total_mb=doc.get("memory_total_mb"),
                   uid=doc.get("uid"),
                   numpy_version=numpy.get("version"), numpy_error=numpy.get("error"),
                   onnxruntime_version=ort.get("version"), onnxruntime_error=ort.get("error"),
                   providers=tuple(ort.get("available_providers") or ()),
                   genai_version=(doc.get("onnxruntime_genai") or {}).get("version"),
                   genai_error=(doc.get("onnxruntime_genai") or {}).get("broken"), free_bytes=disk.get("free_bytes"),
                   used_bytes=disk.get("used_bytes"), root_writable=disk.get("writable"),
                   power_source=power.get("source") or "none", power_readable=power.get("readable"),
                   power_error=power.get("error"), enrolled=trust.get("enrolled"),
                   signers_sha256=trust.get("signers_sha256"))

    @classmethod
    def unusable_python(cls, message: str) -> DeviceFacts:
        return cls(python_error=message)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["providers"] = list(self.providers)
        return out


def runtime_of(facts: dict[str, Any] | None) -> str:
    """A device's interpreter, onnxruntime and architecture in a few words (from its facts)."""
    if not facts:
        return "—"
    if facts.get("python_error"):
        return "no usable python"
    ort = f"ort {facts['onnxruntime_version']}" if facts.get("onnxruntime_version") else "no onnxruntime"
    return f"py {facts.get('python_version')} · {ort} · {facts.get('machine')}"


@dataclass(frozen=True)
class DeviceNeeds:
    """What a device must have to run a deployment's release, and where each need is written."""

    python: str                                   # device.python as written (after substitution)
    python_at: str                                # file:line of device.python
    providers: tuple[str, ...] = ()
    providers_at: str = ""
    power_needed: bool = False                    # an energy or power SLO depends on the sensor
    power_at: str = ""
    root: str = ""
    root_at: str = ""
    disk_budget_bytes: int | None = None          # device.disk_budget_mb
    disk_budget_at: str = ""
    signers_sha256: str | None = None             # the fleet's trust.allowed_signers, when releases are signed
    signers_at: str = ""
    enroll_command: str = ""
    genai_version: str | None = None              # text-generation with onnxruntime-genai: the version it needs
    genai_at: str = ""
    memory_bytes: int = 0                         # text-generation: the model and its KV cache at max_length
    memory_limit_mb: float | None = None          # the profile's limits.max_memory_mb
    memory_at: str = ""


@dataclass(frozen=True)
class Preflight:
    refusals: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.refusals


def _version_tuple(text: str | None) -> tuple[int, ...]:
    parts = []
    for piece in (text or "").split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _mb(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def _generation_refusals(device: str, facts: DeviceFacts, needs: DeviceNeeds, shown: str) -> list[str]:
    """A decoder needs its generation runtime and room for its weights and KV cache."""
    refusals = []
    if needs.genai_version is not None:
        wanted = needs.genai_version
        if facts.genai_version is None:
            why = f" ({facts.genai_error})" if facts.genai_error else ""
            refusals.append(f"{device}: {shown} has no onnxruntime-genai{why}, which this profile generates with: "
                            f"install onnxruntime-genai=={wanted} on the device or set generation.runtime: "
                            f"onnxruntime ({needs.genai_at})")
        elif _version_tuple(facts.genai_version)[:2] != _version_tuple(wanted)[:2]:
            refusals.append(f"{device}: onnxruntime-genai {facts.genai_version} on the device, {wanted} wanted: "
                            f"install onnxruntime-genai=={wanted} or set generation.version ({needs.genai_at})")
    if needs.memory_bytes:
        mb = needs.memory_bytes / 2**20
        if needs.memory_limit_mb is not None and mb > needs.memory_limit_mb:
            refusals.append(f"{device}: the model and its KV cache at max_length need {mb:.1f} MB, over the "
                            f"profile's limits.max_memory_mb {needs.memory_limit_mb:g} ({needs.memory_at}): lower "
                            "generation.max_length, quantize further, or raise the limit")
        elif facts.memory_total_mb is not None and mb > facts.memory_total_mb:
            refusals.append(f"{device}: the model and its KV cache at max_length need {mb:.1f} MB; the device has "
                            f"{facts.memory_total_mb:.0f} MB: lower generation.max_length or quantize further")
    return refusals


def preflight(device: str, facts: DeviceFacts, needs: DeviceNeeds, bytes_to_move: int,
              build_onnxruntime: str | None = None, release_bytes: int = 0) -> Preflight:
    """Reasons to refuse this device (nothing is pushed then) and warnings worth showing.

    ``bytes_to_move``: blobs the device lacks; ``release_bytes``: the new release directory (its own copies).
    """
    python = needs.python
    fix_python = f"set device.python ({needs.python_at})"
    if facts.python_error:
        return Preflight((f"{device}: {python} cannot run the agent ({facts.python_error}): install python3 "
                          f"({'.'.join(map(str, MIN_PYTHON))} or newer) with numpy and onnxruntime on the device "
                          f"or {fix_python}",))
    refusals, warnings = [], []
    shown = python if facts.python_executable in (None, python) else f"{python} ({facts.python_executable})"
    if _version_tuple(facts.python_version) < MIN_PYTHON:
        refusals.append(f"{device}: {shown} is Python {facts.python_version}; the agent needs "
                        f"{'.'.join(map(str, MIN_PYTHON))} or newer: install a newer python3 or {fix_python}")
    missing = [(module, error) for module, version, error in (
        ("numpy", facts.numpy_version, facts.numpy_error),
        ("onnxruntime", facts.onnxruntime_version, facts.onnxruntime_error)) if version is None]
    if missing:
        names = [module for module, _ in missing]
        details = "; ".join(error for _, error in missing if error and "No module named" not in error)
        refusals.append(f"{device}: {shown} has no {' or '.join(names)}" + (f" ({details})" if details else "")
                        + f": install {' and '.join(names)} on the device or {fix_python}")
    if facts.onnxruntime_version is not None:
        for provider in (p for p in needs.providers if p not in facts.providers):
            package = "onnxruntime-gpu" if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") \
                else "an onnxruntime build that includes it"
            refusals.append(f"{device}: onnxruntime {facts.onnxruntime_version} at {shown} lacks {provider} "
                            f"(available: {', '.join(facts.providers) or 'none'}): install {package} on the "
                            f"device or change execution_providers ({needs.providers_at})")
        if build_onnxruntime and _version_tuple(facts.onnxruntime_version)[:2] < _version_tuple(build_onnxruntime)[:2]:
            warnings.append(f"{device}: onnxruntime {facts.onnxruntime_version} on the device is older than "
                            f"{build_onnxruntime} on the build host; int8 kernels and supported opsets may differ")
    refusals += _generation_refusals(device, facts, needs, shown)
    if facts.root_writable is False:
        refusals.append(f"{device}: {needs.root} cannot be written (or created) by the SSH user (uid "
                        f"{facts.uid if facts.uid is not None else '?'}): give that user the directory or set "
                        f"device.root ({needs.root_at})")
    growth = bytes_to_move + release_bytes
    if facts.free_bytes is not None and growth and growth + DISK_MARGIN_BYTES > facts.free_bytes:
        refusals.append(f"{device}: {_mb(facts.free_bytes)} free under {needs.root} but the release needs "
                        f"{_mb(growth + DISK_MARGIN_BYTES)} (files to move, the release's copies and a 1 MiB margin): "
                        f"free space on the device or set device.root ({needs.root_at})")
    budget = needs.disk_budget_bytes
    if budget is not None and facts.used_bytes is not None and growth and facts.used_bytes + growth > budget:
        refusals.append(f"{device}: edgeops would use {_mb(facts.used_bytes + growth)} under {needs.root}, over its "
                        f"disk_budget_mb of {_mb(budget)}: raise device.disk_budget_mb or lower keep_releases "
                        f"({needs.disk_budget_at})")
    if facts.power_readable is False:
        text = f"{device}: power sensor ({facts.power_source}) is not readable: {facts.power_error}"
        if needs.power_needed:
            refusals.append(f"{text}: fix power.sensor ({needs.power_at}) or drop the energy/power SLO")
        else:
            warnings.append(f"{text}; energy will not be measured")
    if needs.signers_sha256 and facts.enrolled is not None and facts.signers_sha256 != needs.signers_sha256:
        what = "is not enrolled for signed releases" if not facts.enrolled else \
            "trusts another allowed-signers file than the fleet's"
        refusals.append(f"{device}: {what} (trust.allowed_signers, {needs.signers_at}): run "
                        f"{needs.enroll_command} (a device that trusts a key takes a new file only signed by it)")
    return Preflight(tuple(refusals), tuple(warnings))
