"""A release: the files that land in ``releases/<id>/`` on one device, and its id.

The id derives from the digests of everything in it (artifact, golden set,
runtime config), so the same inputs always name the same release and a
device that already has it needs nothing. That id is the device's
*materialisation*: its runtime config carries the device's own values.
The fleet-wide release (``rel-…``) names what every device of the deployment
runs, whatever its name, address or root: the artifacts and the configs with
those values as placeholders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edgeops import __version__
from edgeops.compress.cache import Artifact
from edgeops.generative.config import GENAI_CONFIG_FILE, TOKENIZER_FILE, genai_config
from edgeops.render import RenderedConfig
from edgeops.runtime_config import digest


@dataclass(frozen=True)
class ReleaseFile:
    name: str
    sha256: str
    size: int
    local: Path | None = None      # on this machine (artifact files)
    content: bytes | None = None   # small generated files (runtime.json, release.json)


@dataclass(frozen=True)
class Release:
    id: str
    deployment: str
    artifact_sha256: str
    config_digest: str
    files: tuple[ReleaseFile, ...]
    generic_config: str = ""     # the runtime config with the device's own values as placeholders

    @property
    def variant(self) -> tuple[str, str, str]:
        """What this release shares with every device of its class: (model, golden set, generic config) digests."""
        golden = next(f.sha256 for f in self.files if f.name == "golden.npz")
        return self.artifact_sha256, golden, digest(self.generic_config)

    @property
    def model_bytes(self) -> int:
        return sum(f.size for f in self.files if f.local is not None)


def _bytes_file(name: str, content: bytes) -> ReleaseFile:
    return ReleaseFile(name, hashlib.sha256(content).hexdigest(), len(content), content=content)


def make_release(deployment: str, artifact: Artifact, config: RenderedConfig) -> Release:
    report = artifact.report["artifact"]
    release_id = "r-" + hashlib.sha256(f"{report['sha256']}:{report['golden_sha256']}:{config.digest}".encode()).hexdigest()[:16]
    model = ReleaseFile("model.onnx", report["sha256"], report["size_bytes"], local=artifact.model)
    golden = ReleaseFile("golden.npz", report["golden_sha256"], artifact.golden.stat().st_size, local=artifact.golden)
    runtime = _bytes_file("runtime.json", config.text.encode())
    meta = {"id": release_id, "deployment": deployment, "artifact_sha256": report["sha256"],
            "config_digest": config.digest, "edgeops_version": __version__, "build_key": artifact.key}
    release_json = _bytes_file("release.json", (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    files = [model, golden, runtime, release_json]
    if "generation" in config.data:  # what the device's generation runtime reads beside the model
        tokenizer = artifact.directory / TOKENIZER_FILE
        files.append(ReleaseFile(TOKENIZER_FILE, report["generation"]["tokenizer_sha256"], tokenizer.stat().st_size,
                                 local=tokenizer))
        files.append(_bytes_file(GENAI_CONFIG_FILE, (json.dumps(genai_config(config.data), indent=2,
                                                                sort_keys=True) + "\n").encode()))
    return Release(release_id, deployment, report["sha256"], config.digest, tuple(files),
                   config.generic_text or config.text)


def fleet_release_id(deployment: str, releases: list[Release]) -> str:
    """One id for the release a deployment asks of all its devices (stable under adding a device of a known class)."""
    variants = sorted({r.variant for r in releases})
    return "rel-" + hashlib.sha256(json.dumps([deployment, variants]).encode()).hexdigest()[:12]


def write_local(release: Release, directory: Path) -> Path:
    """Lay a release out in a local directory (for the agent's tests and the local transport)."""
    directory.mkdir(parents=True, exist_ok=True)
    for item in release.files:
        data = item.content if item.content is not None else item.local.read_bytes()  # type: ignore[union-attr]
        (directory / item.name).write_bytes(data)
    return directory
