"""The tight-goal tools one by one on the generated sentence encoder: what each does to fidelity and speed.

    python examples/make_sentence_encoder.py      # once (about 3 minutes): examples/generated/
    python bench/int8_tools.py

Dynamic int8 (onnxruntime's quantize_dynamic, per-channel int8 weights) of: the model as it is; activations
smoothed (SmoothQuant, alpha 0.5); outlier channels split off into float MatMuls (LLM.int8()'s split, ratio 6);
activations rotated by block Hadamard matrices of 64 channels (QuaRot-style, at run time), alone and after
smoothing; and, to size what weight rounding costs, the int8 weights alone with float activations (fake-quantized
weights in a float model: what weight rounding could improve at most); GPTQ rounding of the int8 weights, and of
int4 weight-only blocks (MatMulNBits, 32 and 128 input channels per scale, int8 activations in the kernel: what
``auto`` tries first on a CPU) beside onnxruntime's round-to-nearest. Fidelity is mean and worst cosine to the
fp32 embedding over the first 128 evaluation sentences; speed is the 1-thread p50, the models timed
interleaved in 12 rounds of 8 runs each.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import REPO, machine  # noqa: E402

from edgeops.compress.gptq import gptq  # noqa: E402
from edgeops.compress.outliers import float_parts, split_outliers  # noqa: E402
from edgeops.compress.rotate import rotate  # noqa: E402
from edgeops.compress.smooth import smooth  # noqa: E402

GENERATED = REPO / "examples" / "generated"
SENTENCES = 128


def _inputs(name: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in np.load(GENERATED / name).items() if k != "labels"}


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embeddings(path: Path, data: dict[str, np.ndarray]) -> np.ndarray:
    session = _session(path, 0)
    names = [i.name for i in session.get_inputs()]
    return np.concatenate([session.run(["embedding"], {k: data[k][i:i + 1] for k in names})[0]
                           for i in range(SENTENCES)])


def interleaved_p50(paths: list[Path], data: dict[str, np.ndarray]) -> list[float]:
    sessions = [_session(p, 1) for p in paths]
    feed = {i.name: data[i.name][0:1] for i in sessions[0].get_inputs()}
    times: list[list[float]] = [[] for _ in sessions]
    for session in sessions:
        for _ in range(5):
            session.run(None, feed)
    for _ in range(12):
        for index, session in enumerate(sessions):
            for _ in range(8):
                started = time.perf_counter()
                session.run(None, feed)
                times[index].append(time.perf_counter() - started)
    return [float(np.median(t)) * 1e3 for t in times]


def int8(src: Path, dst: Path) -> Path:
    excluded = float_parts(onnx.load(str(src), load_external_data=False).graph)
    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                     nodes_to_exclude=excluded or None)
    return dst


def int4(src: Path, dst: Path, block: int) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block, is_symmetric=True,
                                     accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    return dst


def rounded(src: Path, quantized: Path, calibration: dict[str, np.ndarray]) -> Path:
    """A copy of ``quantized`` with GPTQ's integers (on 128 calibration samples)."""
    dst = quantized.with_name(f"{quantized.stem}-gptq.onnx")
    dst.write_bytes(quantized.read_bytes())
    print(gptq(src, dst, calibration, 128), file=sys.stderr)
    return dst


def weights_alone(src: Path, dst: Path) -> Path:
    """Every constant 2-D MatMul weight rounded to per-column int8 and back: a float model with int8 weights."""
    model = onnx.load(str(src))
    initializers = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers and len(initializers[node.input[1]].dims) == 2:
            weight = numpy_helper.to_array(initializers[node.input[1]])
            scale = np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127
            rounded = (np.clip(np.round(weight / scale), -127, 127) * scale).astype(np.float32)
            initializers[node.input[1]].CopyFrom(numpy_helper.from_array(rounded, node.input[1]))
    onnx.save(model, str(dst))
    return dst


def main() -> None:
    original = GENERATED / "sentence_encoder.onnx"
    if not original.exists():
        raise SystemExit("run examples/make_sentence_encoder.py first (it writes examples/generated/)")
    calibration, evaluation = _inputs("sentence_calibration.npz"), _inputs("sentence_evaluation.npz")
    reference = embeddings(original, evaluation)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        smooth(original, work / "smoothed.onnx", calibration, 0.5)
        note = split_outliers(original, work / "split.onnx", calibration, 6.0)
        turned = rotate(original, work / "rotated.onnx", 64)
        rotate(work / "smoothed.onnx", work / "smoothed-rotated.onnx", 64)
        rows = [("dynamic int8", int8(original, work / "plain-int8.onnx")),
                ("smoothed (alpha 0.5) + dynamic int8", int8(work / "smoothed.onnx", work / "smoothed-int8.onnx")),
                ("outlier channels split (ratio 6) + dynamic int8", int8(work / "split.onnx", work / "split-int8.onnx")),
                ("rotated (Hadamard, 64) + dynamic int8", int8(work / "rotated.onnx", work / "rotated-int8.onnx")),
                ("smoothed, then rotated + dynamic int8",
                 int8(work / "smoothed-rotated.onnx", work / "smoothed-rotated-int8.onnx")),
                ("int8 weights alone, float activations", weights_alone(original, work / "weights.onnx"))]
        rows += [("dynamic int8, GPTQ rounding", rounded(original, rows[0][1], calibration)),
                 ("rotated + dynamic int8, GPTQ rounding", rounded(work / "rotated.onnx", rows[3][1], calibration))]
        for block in (32, 128):
            nearest = int4(original, work / f"int4-{block}.onnx", block)
            rows += [(f"int4 weights, block {block}", nearest),
                     (f"int4 weights, block {block}, GPTQ rounding", rounded(original, nearest, calibration))]
        speeds = interleaved_p50([original] + [path for _, path in rows], evaluation)
        print(machine())
        print(f"split: {note}\nrotation: {turned}\n")
        print("| model | mean cosine | worst cosine | 1-thread p50 ms | size MB |")
        print("|---|---|---|---|---|")
        print(f"| fp32 | 1.000000 | 1.0000 | {speeds[0]:.2f} | {original.stat().st_size / 1e6:.1f} |")
        for (label, path), speed in zip(rows, speeds[1:]):
            out = embeddings(path, evaluation)
            cosine = np.sum(out * reference, 1) / np.linalg.norm(out, axis=1) / np.linalg.norm(reference, axis=1)
            print(f"| {label} | {cosine.mean():.6f} | {cosine.min():.4f} | {speed:.2f} | "
                  f"{path.stat().st_size / 1e6:.1f} |")


if __name__ == "__main__":
    main()
