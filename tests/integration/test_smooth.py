"""Activation smoothing (SmoothQuant) and the dynamic int8 search, on graphs with outlier channels.

The model here is built with onnx.helper from seeded random weights: a LayerNorm whose scale has two
channels 30x the rest (the "outlier dimensions" of trained BERT-family encoders) feeding two MatMuls
(as Q and K read one tensor) and a residual Add, then a second MatMul.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeops.compress.outliers import float_parts, outlier_channels, split_outliers
from edgeops.compress.smooth import smooth, smoothable_groups
from edgeops.manifest.workspace import load_workspace
from labkit.artifacts import build_for

WIDTH, TOKENS = 256, 64  # large enough for int8 to run faster than float on a CPU


def outlier_model(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    gamma = np.ones(WIDTH, np.float32)
    gamma[[5, 40]] = 30.0
    weights = {
        "gamma": gamma, "beta": np.zeros(WIDTH, np.float32),
        "w_q": rng.normal(0, 0.1, (WIDTH, WIDTH)).astype(np.float32),
        "w_k": rng.normal(0, 0.1, (WIDTH, WIDTH)).astype(np.float32),
        "w_out": rng.normal(0, 0.1, (WIDTH, WIDTH)).astype(np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["normed"], name="norm", axis=-1),
        helper.make_node("MatMul", ["normed", "w_q"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["normed", "w_k"], ["k"], name="k_proj"),
        helper.make_node("Add", ["q", "k"], ["qk"], name="mix"),
        helper.make_node("Add", ["qk", "normed"], ["residual"], name="residual_add"),
        helper.make_node("Relu", ["residual"], ["hidden"], name="relu"),
        helper.make_node("MatMul", ["hidden", "w_out"], ["y"], name="out_proj"),
    ]
    graph = helper.make_graph(nodes, "outliers",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TOKENS, WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", TOKENS, WIDTH])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeops-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def inputs(count: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (count, TOKENS, WIDTH)).astype(np.float32)}


def outputs(path: Path, data: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": data["x"][i:i + 1]})[0] for i in range(len(data["x"]))])


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def test_smoothing_is_exact_in_float_and_lifts_dynamic_int8_fidelity(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    original, smoothed = tmp_path / "model.onnx", tmp_path / "smoothed.onnx"
    outlier_model(original)
    graph = onnx.load(str(original)).graph
    assert {t: sorted(n.name for n in nodes) for t, nodes in smoothable_groups(graph).items()} == \
        {"normed": ["k_proj", "q_proj"], "hidden": ["out_proj"]}
    note = smooth(original, smoothed, inputs(32, 1), alpha=0.5)
    assert "2 activation(s) feeding 3 MatMul(s)" in note
    rewritten = onnx.load(str(smoothed)).graph
    muls = [n for n in rewritten.node if n.op_type == "Mul"]
    assert len(muls) == 2  # one per activation: Q and K share theirs
    assert next(n for n in rewritten.node if n.name == "residual_add").input[1] == "normed"  # the residual stays unscaled
    data = inputs(64, 2)
    reference = outputs(original, data)
    np.testing.assert_allclose(outputs(smoothed, data), reference, rtol=1e-3, atol=1e-3)

    plain_int8, smoothed_int8 = tmp_path / "plain-int8.onnx", tmp_path / "smoothed-int8.onnx"
    quantize_dynamic(str(original), str(plain_int8), per_channel=True, weight_type=QuantType.QInt8)
    quantize_dynamic(str(smoothed), str(smoothed_int8), per_channel=True, weight_type=QuantType.QInt8)
    plain_error = 1 - mean_cosine(outputs(plain_int8, data), reference)
    smoothed_error = 1 - mean_cosine(outputs(smoothed_int8, data), reference)
    assert smoothed_error < plain_error / 3, (plain_error, smoothed_error)


def test_outlier_channels_split_off_are_exact_in_float_and_lift_dynamic_int8_further_than_smoothing(
        tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    original, split = tmp_path / "model.onnx", tmp_path / "split.onnx"
    outlier_model(original)
    note = split_outliers(original, split, inputs(32, 1), ratio=6.0)
    assert "2 channel(s)" in note and "beside 2 int8 MatMul(s)" in note, note  # channels 5 and 40, read by Q and K
    graph = onnx.load(str(split)).graph
    assert sorted(float_parts(graph)) == ["EdgeopsOutlierMatMul_1_0", "EdgeopsOutlierMatMul_1_1"]
    index = next(i for i in graph.initializer if i.name.startswith("edgeops_outlier_index"))
    assert numpy_helper.to_array(index).tolist() == [5, 40]
    data = inputs(64, 2)
    reference = outputs(original, data)
    np.testing.assert_allclose(outputs(split, data), reference, rtol=1e-3, atol=1e-3)

    smoothed = tmp_path / "smoothed.onnx"
    smooth(original, smoothed, inputs(32, 1), alpha=0.5)
    errors = {}
    for name, path in (("plain", original), ("smoothed", smoothed), ("split", split)):
        int8 = tmp_path / f"{name}-int8.onnx"
        quantize_dynamic(str(path), str(int8), per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_exclude=float_parts(onnx.load(str(path)).graph) or None)
        errors[name] = 1 - mean_cosine(outputs(int8, data), reference)
    assert errors["split"] < errors["plain"] / 3 and errors["split"] < errors["smoothed"], errors
    # the float part is what the split added and nothing more: every other MatMul is int8
    ops = [n.op_type for n in onnx.load(str(tmp_path / "split-int8.onnx")).graph.node]
    assert ops.count("MatMul") == 2 and ops.count("MatMulInteger") == 3


def test_rotated_activations_are_exact_in_float_and_lift_dynamic_int8_fidelity(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgeops.compress.rotate import hadamard, rotate

    assert np.allclose(hadamard(64) @ hadamard(64).T, np.eye(64), atol=1e-6)
    original, rotated = tmp_path / "model.onnx", tmp_path / "rotated.onnx"
    outlier_model(original)
    note = rotate(original, rotated, 64)
    assert "2 activation(s) feeding 3 MatMul(s)" in note, note
    graph = onnx.load(str(rotated)).graph
    assert sorted(float_parts(graph)) == ["EdgeopsRotate_0", "EdgeopsRotate_1"]  # one per activation: Q, K share
    assert next(n for n in graph.node if n.name == "residual_add").input[1] == "normed"  # the residual is not rotated
    data = inputs(64, 2)
    reference = outputs(original, data)
    np.testing.assert_allclose(outputs(rotated, data), reference, rtol=1e-3, atol=1e-3)

    errors = {}
    for name, path in (("plain", original), ("rotated", rotated)):
        int8 = tmp_path / f"{name}-int8.onnx"
        quantize_dynamic(str(path), str(int8), per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_exclude=float_parts(onnx.load(str(path)).graph) or None)
        errors[name] = 1 - mean_cosine(outputs(int8, data), reference)
    assert errors["rotated"] < errors["plain"] / 3, errors
    ops = [n.op_type for n in onnx.load(str(tmp_path / "rotated-int8.onnx")).graph.node]
    assert ops.count("MatMul") == 2 and ops.count("MatMulInteger") == 3  # the rotations alone stay float
    # a MatMul whose rows are not a multiple of the block is left as it is
    assert "no MatMul" in rotate(original, tmp_path / "odd.onnx", 128 * 4)


def test_an_activation_without_outliers_is_left_alone() -> None:
    flat = np.ones(64)
    assert outlier_channels(flat, 6.0) == []
    spiked = flat.copy()
    spiked[[3, 9]] = [7.0, 100.0]
    assert outlier_channels(spiked, 6.0) == [3, 9]
    assert outlier_channels(spiked, 8.0) == [9]
    many = np.where(np.arange(64) % 2 == 0, 50.0, 1.0)  # half the channels large: at most one in 16 goes float
    assert len(outlier_channels(many, 6.0)) <= 64 // 16
    assert outlier_channels(np.ones(8) * [1, 1, 1, 1, 1, 1, 1, 90], 6.0) == []  # too few channels to split


def encoder_deployment(root: Path, max_drop: float, quantize: str) -> str:
    """A deployment of the outlier model in a copy of the repository (the assistant's manifest, adapted)."""
    outlier_model(root / "examples" / "models" / "outliers.onnx")
    np.savez(root / "examples" / "data" / "outliers_calibration.npz", **inputs(64, 3))
    np.savez(root / "examples" / "data" / "outliers_evaluation.npz", **inputs(300, 4))
    text = (root / "manifests" / "assistant.yaml").read_text()
    text = text.replace("name: vehicle-assistant", "name: outlier-encoder")
    text = text.replace("assistant_encoder.onnx", "outliers.onnx").replace("assistant_", "outliers_")
    text = text.replace("      - {name: input_ids, shape: [batch, 32], dtype: int64}",
                        f"      - {{name: x, shape: [batch, {TOKENS}, {WIDTH}], dtype: float32}}")
    text = text.replace("      - {name: embedding, shape: [batch, 128], dtype: float32}\n"
                        "      - {name: logits, shape: [batch, 8], dtype: float32}",
                        f"      - {{name: y, shape: [batch, {TOKENS}, {WIDTH}], dtype: float32}}")
    text = text.replace("output: embedding", "output: y").replace("max_drop: 0.05", f"max_drop: {max_drop}")
    text = text.replace("    - quantize: {mode: dynamic, per_channel: true}\n", f"    - quantize: {quantize}\n")
    (root / "manifests" / "outliers.yaml").write_text(text)
    return "outlier-encoder"


def test_auto_smooths_when_plain_dynamic_int8_misses_a_fidelity_goal_and_confirms_on_the_whole_set(
        repo_copy: Path) -> None:
    name = encoder_deployment(repo_copy, 0.0, "{mode: auto, candidates: [dynamic], min_speedup: 1.0}")
    manifest = repo_copy / "manifests" / "outliers.yaml"
    loose = build_for(load_workspace(repo_copy), name, "cpu").report["stages"][1]["candidates"]
    # the dynamic family is searched with and without onnxruntime's pre-processing, each measured
    assert {"dynamic", "dynamic unprocessed"} <= {c["mode"] for c in loose}
    plain = next(c for c in loose if c["mode"] == "dynamic")["measurement"]["quality"]
    smoothed = [c for c in loose if c["mode"].startswith("dynamic smoothed")]
    assert smoothed, [c["mode"] for c in loose]  # searched even when plain misses (max_drop 0: nothing passes)
    assert smoothed[0]["measurement"]["quality"]["drop"] < plain["drop"]
    # nothing dynamic met it: the closest ones were tried with their activations rotated, then with their outlier
    # channels split off, before mixed precision, and both lift fidelity over plain int8 too
    modes = [c["mode"] for c in loose]
    rotated = [c for c in loose if c["mode"].startswith("dynamic rotated")]
    split = [c for c in loose if c["mode"].startswith("dynamic split")]
    assert rotated and all(c["measurement"]["quality"]["drop"] < plain["drop"] for c in rotated), rotated
    assert split and all(c["measurement"]["quality"]["drop"] < plain["drop"] for c in split), split
    assert modes.index(rotated[0]["mode"]) < modes.index(split[0]["mode"]) < min(
        (i for i, c in enumerate(loose) if "mixed" in c["mode"]), default=len(loose))
    # a goal between the two: plain misses it, the smoothed graph meets it and is chosen
    goal = (plain["drop"] + smoothed[0]["measurement"]["quality"]["drop"]) / 2
    manifest.write_text(manifest.read_text().replace("max_drop: 0.0", f"max_drop: {goal:.3e}"))
    result = build_for(load_workspace(repo_copy), name, "cpu")
    step = result.report["stages"][1]
    chosen = next(c for c in step["candidates"] if c["chosen"])
    assert chosen["mode"].startswith("dynamic smoothed"), [c["mode"] for c in step["candidates"]]
    assert "screened_samples" not in chosen["measurement"]["quality"]  # the winner is measured on all 300
    assert step["quality"]["drop"] <= goal and "screened_samples" not in step["quality"]
    ops = {n.op_type for n in onnx.load(str(result.artifact.model)).graph.node}
    assert {"Mul", "DynamicQuantizeLinear"} <= ops
