"""Block maps and block patches: the controller's and the device's hashes agree, the map is what a pull
device reads, and a patch is small where a file changed little."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeops.agent.edgeops_agent import block_hashes as device_hashes
from edgeops.blocks import BLOCKMAP_DIGEST_BYTES, BLOCKMAP_FORMAT, block_hashes, blockmap, patch_block


@given(st.binary(min_size=0, max_size=5000), st.sampled_from([64, 256, 1000]))
@settings(max_examples=40, deadline=None)
def test_the_controller_and_the_device_hash_blocks_alike(data: bytes, block: int) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile() as handle:
        handle.write(data)
        handle.flush()
        assert device_hashes(handle.name, block) == block_hashes(data, block)


def test_block_size_keeps_maps_small() -> None:
    assert patch_block(10) == 256 and patch_block(256 * 4096) == 256 and patch_block(256 * 4096 + 1) == 512
    assert (90_000_000 + patch_block(90_000_000) - 1) // patch_block(90_000_000) <= 4096


def test_a_block_map_names_every_block_by_a_short_digest() -> None:
    data = bytes(range(256)) * 40
    header, _, digests = blockmap(data).partition(b"\n")
    meta = json.loads(header)
    assert meta == {"format": BLOCKMAP_FORMAT, "size": len(data), "block": 256, "digest_bytes": BLOCKMAP_DIGEST_BYTES}
    assert len(digests) == 40 * BLOCKMAP_DIGEST_BYTES
    assert digests[:BLOCKMAP_DIGEST_BYTES] == hashlib.sha256(data[:256]).digest()[:BLOCKMAP_DIGEST_BYTES]


def test_pull_daemon_runs_are_consecutive_blocks() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "edgeops" / "agent"))
    from edgeops_pulld import _runs

    assert _runs([]) == [] and _runs([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 7), (9, 10)]
