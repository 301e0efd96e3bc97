"""Calibration and evaluation data: ``.npz`` files with one array per model input.

The first axis counts samples; an optional ``labels`` array (integers) enables
the accuracy metric. Every mismatch with the model is a located error on the
manifest line that names the file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeops.compress.request import BuildRequest

DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
          "uint8": np.uint8, "int8": np.int8, "bool": np.bool_}


@dataclass(frozen=True)
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    sha256: str

    @property
    def count(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, count: int) -> "Dataset":
        return self.slice(0, count)

    def slice(self, start: int, stop: int | None = None) -> "Dataset":
        return Dataset({k: v[start:stop] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[start:stop], self.sha256)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_dataset(request: BuildRequest, which: str) -> Dataset:
    """Read ``spec.data.<which>`` and check it against ``spec.model.inputs``."""
    doc = request.source
    loc, relative, path = request.data_loc(which), request.data_file(which), request.data_path(which)
    try:
        archive = np.load(path, allow_pickle=False)
        arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise doc.error(loc, f"{which} data not found: {relative}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise doc.error(loc, f"{relative} is not a readable .npz file ({exc})") from None
    inputs: dict[str, np.ndarray] = {}
    count: int | None = None
    for tensor in request.model.inputs:
        if tensor.name not in arrays:
            raise doc.error(loc, f"{relative} has no array '{tensor.name}' for model input '{tensor.name}' "
                                 f"(it has: {', '.join(sorted(arrays)) or 'nothing'})")
        array = arrays[tensor.name]
        expected = tensor.shape[1:]
        if array.ndim != len(tensor.shape) or any(
                isinstance(d, int) and d != a for d, a in zip(expected, array.shape[1:])):
            raise doc.error(loc, f"array '{tensor.name}' has shape {list(array.shape)}; model input "
                                 f"'{tensor.name}' takes {tensor.shape} (first axis = samples)")
        wanted = DTYPES[tensor.dtype]
        if array.dtype != wanted:
            if not (np.issubdtype(array.dtype, np.floating) and np.issubdtype(wanted, np.floating)):
                raise doc.error(loc, f"array '{tensor.name}' is {array.dtype}; model input takes {tensor.dtype}")
            array = array.astype(wanted)
        if count is not None and len(array) != count:
            raise doc.error(loc, f"arrays have different sample counts ({count} and {len(array)})")
        count = len(array)
        inputs[tensor.name] = array
    if count == 0:
        raise doc.error(loc, f"{relative} holds no samples")
    labels = arrays.get("labels")
    if labels is not None and (labels.ndim != 1 or len(labels) != count or not np.issubdtype(labels.dtype, np.integer)):
        raise doc.error(loc, f"'labels' must be {count} integers, one per sample (got shape {list(labels.shape)})")
    if which == "evaluation" and request.quality.metric == "accuracy" and labels is None:
        raise doc.error(("spec", "quality", "metric"), f"accuracy needs a 'labels' array in {relative}; "
                                                       "add it or use top1_agreement/cosine")
    return Dataset(inputs, labels, file_sha256(path))
