"""Block maps: how a file is sent as the blocks that differ from a file the device already holds (a new head,
a new golden set). One definition for both doors: over SSH the agent hashes its base blob and the controller
sends the changed blocks (``edgeops.blockpatch/v1``); a pull device fetches the new file's block map from the
registry and asks for the changed blocks' byte ranges. Whatever is rebuilt must hash to the signed file table."""

from __future__ import annotations

import hashlib
import json

PATCH_FORMAT = "edgeops.blockpatch/v1"
BLOCKMAP_FORMAT = "edgeops.blockmap/v1"
PATCH_MIN_BYTES = 16 * 1024  # smaller files go whole: a patch's round trips cost more than they save


def patch_block(size: int) -> int:
    """Block size: 256 bytes, doubled until a file has at most 4096 blocks."""
    block = 256
    while size > block * 4096:
        block *= 2
    return block


def block_hashes(data: bytes, block: int) -> list[str]:
    """The first 16 hex digits of each block's sha256 (the agent's ``block_hashes`` of a file, same numbers)."""
    return [hashlib.sha256(data[i:i + block]).hexdigest()[:16] for i in range(0, len(data), block)]


BLOCKMAP_DIGEST_BYTES = 4  # per block: a collision only costs the whole file (the result must hash as signed)


def blockmap(data: bytes) -> bytes:
    """The block map a pull device reads to fetch only what differs from a file it holds: a JSON header line,
    then the first BLOCKMAP_DIGEST_BYTES of each block's sha256 (binary: the map is part of what a device
    fetches)."""
    block = patch_block(len(data))
    header = json.dumps({"format": BLOCKMAP_FORMAT, "size": len(data), "block": block,
                         "digest_bytes": BLOCKMAP_DIGEST_BYTES}, sort_keys=True, separators=(",", ":")).encode()
    digests = b"".join(hashlib.sha256(data[i:i + block]).digest()[:BLOCKMAP_DIGEST_BYTES]
                       for i in range(0, len(data), block))
    return header + b"\n" + digests
