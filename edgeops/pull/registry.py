"""Release blobs in an OCI registry (the distribution API, plain HTTP(S)): push once by digest, fetch anywhere.

Each release becomes an OCI artifact manifest tagged with its id: its layers are the release's files
(model, golden set, runtime config), so the registry keeps them and deduplicates them across releases
and fleets, and any registry (Harbor, ECR, GHCR, Zot, docker-registry) or CDN in front of one can serve
them. Devices fetch each blob by its sha256 and check it before use; the registry is not trusted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from edgeops.blocks import PATCH_MIN_BYTES, blockmap
from edgeops.errors import EdgeopsError
from edgeops.release import Release, ReleaseFile

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.edgeops.release.v1"
EMPTY_CONFIG = b"{}"


class RegistryError(EdgeopsError):
    """The OCI registry refused a request or could not be reached."""


@dataclass(frozen=True)
class PushedRelease:
    manifest_digest: str
    blobs_uploaded: int
    bytes_uploaded: int


class Registry:
    """One repository of an OCI registry."""

    def __init__(self, base_url: str, repository: str, ca_file: Path | None = None, timeout_s: float = 60) -> None:
        self.base, self.repository, self.timeout_s = base_url.rstrip("/"), repository, timeout_s
        self.context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None

    def blob_url(self, sha256: str) -> str:
        return f"{self.base}/v2/{self.repository}/blobs/sha256:{sha256}"

    def _request(self, method: str, url: str, data: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.context) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLError):
                raise RegistryError(f"registry {self.base}: TLS failed ({reason})",
                                    hint="pull.ca_file must hold the CA that signed the registry's certificate") from None
            raise RegistryError(f"registry {self.base} unreachable: {reason}",
                                hint="is the registry running and pull.registry right? (`edgeops lab up` starts "
                                     "the lab's)") from None

    def has_blob(self, sha256: str) -> bool:
        status, _, _ = self._request("HEAD", self.blob_url(sha256))
        return status == 200

    def push_blob(self, sha256: str, data: bytes) -> bool:
        """Upload ``data`` under its digest unless the registry has it; True if uploaded."""
        if self.has_blob(sha256):
            return False
        status, headers, body = self._request("POST", f"{self.base}/v2/{self.repository}/blobs/uploads/")
        location = headers.get("Location") or headers.get("location")
        if status != 202 or not location:
            raise RegistryError(f"registry refused an upload to {self.repository} (HTTP {status}): "
                                f"{body[:200].decode(errors='replace')}")
        url = urllib.parse.urljoin(self.base + "/", location)
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": f"sha256:{sha256}"})
        status, _, body = self._request("PUT", url, data, {"Content-Type": "application/octet-stream"})
        if status != 201:
            raise RegistryError(f"registry refused blob sha256:{sha256[:12]} (HTTP {status}): "
                                f"{body[:200].decode(errors='replace')}")
        return True

    def get_blob(self, sha256: str) -> bytes:
        status, _, body = self._request("GET", self.blob_url(sha256))
        if status != 200:
            raise RegistryError(f"registry has no blob sha256:{sha256[:12]} in {self.repository} (HTTP {status})")
        return body

    def push_release(self, release: Release) -> PushedRelease:
        """Every file of ``release`` as a blob, and the block map of each file big enough to be fetched as the
        blocks that differ from what a device holds; then a manifest tagged with the release id that holds them."""
        uploaded = moved = 0
        maps = blockmaps(release)
        for item in release.files:
            data = _content(item)
            if self.push_blob(item.sha256, data):
                uploaded, moved = uploaded + 1, moved + len(data)
        for digest, data in maps.values():
            if self.push_blob(digest, data):
                uploaded, moved = uploaded + 1, moved + len(data)
        config_digest = _sha256(EMPTY_CONFIG)
        self.push_blob(config_digest, EMPTY_CONFIG)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": f"sha256:{config_digest}",
                       "size": len(EMPTY_CONFIG)},
            "layers": [{"mediaType": "application/octet-stream", "digest": f"sha256:{f.sha256}", "size": f.size,
                        "annotations": {"org.opencontainers.image.title": f.name}} for f in release.files] + [
                {"mediaType": BLOCKMAP_TYPE, "digest": f"sha256:{digest}", "size": len(data),
                 "annotations": {"org.opencontainers.image.title": f"{name}.blockmap"}}
                for name, (digest, data) in sorted(maps.items())],
            "annotations": {"dev.edgeops.deployment": release.deployment, "dev.edgeops.release": release.id},
        }, sort_keys=True).encode()
        status, headers, body = self._request("PUT", f"{self.base}/v2/{self.repository}/manifests/{release.id}",
                                              manifest, {"Content-Type": MANIFEST_TYPE})
        if status != 201:
            raise RegistryError(f"registry refused the manifest of {release.id} (HTTP {status}): "
                                f"{body[:200].decode(errors='replace')}")
        return PushedRelease(headers.get("Docker-Content-Digest") or f"sha256:{_sha256(manifest)}", uploaded, moved)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


BLOCKMAP_TYPE = "application/vnd.edgeops.blockmap.v1+json"


@functools.lru_cache(maxsize=256)
def _blockmap_of(sha256: str, path: str | None, content: bytes | None) -> tuple[str, bytes]:
    data = blockmap(Path(path).read_bytes() if path else content or b"")
    return _sha256(data), data


def blockmaps(release: Release) -> dict[str, tuple[str, bytes]]:
    """File name -> (digest, bytes) of the block map of every file of at least PATCH_MIN_BYTES."""
    return {f.name: _blockmap_of(f.sha256, str(f.local) if f.local else None, None if f.local else f.content)
            for f in release.files if f.size >= PATCH_MIN_BYTES}


def _content(item: ReleaseFile) -> bytes:
    if item.local is not None:
        return item.local.read_bytes()
    return item.content or b""
