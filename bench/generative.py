"""The tiny decoder LM built by edgeops and by its peers, every artifact measured by one evaluator.

    python examples/make_tiny_lm.py                 # the full-size model (~7 min on 2 cores), once
    pip install -e '.[bench]'                       # transformers (the builder's input), gguf, llama-cpp-python
    python bench/generative.py [--model-dir examples/generated/tiny_lm] [--threads 1 2]

Artifacts (all from the same trained weights):

* edgeops: the fp32 export, ``quantize: {mode: auto}`` (what manifests/assistant-lm.yaml asks), and int4
  weight-only MatMulNBits (block 32) with int8 and with fp32 compute — built through edgeops' own pipeline, the
  wall time of the auto build kept;
* onnxruntime-genai's model builder, ``-p int4 -e cpu``, from a Hugging Face Llama checkpoint of the weights
  (a byte-level tokenizer made with ``tokenizers``), its wall time kept; and edgeops' ``auto`` started from
  the builder's fp32 graph (``-p fp32``: fused attention and norms) instead of edgeops' own export;
* llama.cpp through llama-cpp-python: the weights written to GGUF (F32) with ``gguf``, quantized to Q4_0 and
  Q4_K_M by llama.cpp itself.

One evaluator: quality is teacher-forced greedy agreement with the fp32 model's continuations of the golden
prompts and perplexity on the held-out text (edgeops' metric definitions); speed is time to first token for a
64-token prompt and decode tokens/s over 32 greedy tokens (median of generations run for ~3 s), with 1 and 2
threads; ONNX artifacts run under onnxruntime-genai (each with its own genai_config.json: edgeops renders
ours) and GGUF under llama.cpp; peak RSS of a fresh process that loads the artifact and runs the speed test.
Each (artifact, threads) runs in its own process, and quality in another. Host CPU only; a figure is not claimed where the host's
load average was above 0.5 per core at the start (the table says so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import REPO, git_commit, machine, markdown_table  # noqa: E402

BOS, EOS, PAD, VOCAB = 256, 257, 258, 259
PROMPT_TOKENS, DECODE_TOKENS, SPEED_SECONDS = 64, 32, 3.0


# ------------------------------------------------------------------ the shared data


def corpus(model_dir: Path) -> dict:
    """Golden prompts, the fp32 model's greedy continuations (golden.json) and the held-out texts, as tokens."""
    golden = json.loads((model_dir / "golden.json").read_text())
    prompts = [[BOS, *g["prompt"].encode()] for g in golden]
    references = [g["continuation"][:32] for g in golden]
    texts = [[BOS, *line.encode(), EOS] for line in (model_dir / "evaluation.txt").read_text().splitlines() if line]
    stream = [t for p in prompts for t in p]
    return {"prompts": prompts, "references": references, "texts": texts[:100],
            "timing_prompt": (stream * (PROMPT_TOKENS // len(stream) + 1))[:PROMPT_TOKENS]}


def score(logits_of, data: dict) -> dict:
    """Agreement (%) and perplexity from ``logits_of(tokens) -> [len(tokens), vocab]`` (teacher-forced)."""
    from edgeops.metrics import perplexity, token_agreement

    predicted, reference, nll = [], [], []
    for prompt, continuation in zip(data["prompts"], data["references"]):
        logits = np.asarray(logits_of(prompt + continuation[:-1]))[len(prompt) - 1:]
        predicted.append(list(logits.argmax(axis=1)))
        reference.append(continuation)
    for text in data["texts"]:
        logits = np.asarray(logits_of(text[:-1]), dtype=np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        nll.append([-log_probs[np.arange(len(text) - 1), text[1:]].sum(), len(text) - 1])
    width = max(len(r) for r in reference)
    pad = lambda rows: np.array([r + [-1] * (width - len(r)) for r in rows])  # noqa: E731
    return {"agreement": token_agreement(pad(predicted), pad(reference)), "perplexity": perplexity(np.array(nll))}


# ------------------------------------------------------------------ one measurement (run in a child process)


def _speed(generate) -> dict:
    """``generate() -> (ttft_ms, [ms per decoded token])`` repeated for SPEED_SECONDS after a warm-up."""
    generate()
    ttft, per_token = [], []
    started = time.perf_counter()
    while time.perf_counter() - started < SPEED_SECONDS or len(ttft) < 3:
        first, samples = generate()
        ttft.append(first)
        per_token.extend(samples)
    return {"ttft_ms": float(np.median(ttft)), "tokens_per_s": 1000 / float(np.median(per_token)),
            "generations": len(ttft)}


def measure_onnx(directory: Path, threads: int, data: dict, quality: bool) -> dict:
    """Timed as the agent times a release under onnxruntime-genai (its GenaiDecoder), scored by its Decoder."""
    import onnxruntime as ort

    from edgeops.agent.edgeops_agent import GenaiDecoder

    config_path = directory / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"].update(intra_op_num_threads=threads, inter_op_num_threads=1)
    config_path.write_text(json.dumps(config))
    timer = GenaiDecoder(str(directory))
    found = {} if quality else _speed(lambda: timer.timed(data["timing_prompt"], DECODE_TOKENS))
    if quality:
        from edgeops.agent.edgeops_agent import Decoder

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        decoder = Decoder(ort.InferenceSession(str(directory / config["model"]["decoder"]["filename"]), options,
                                               providers=["CPUExecutionProvider"]),
                          config["model"]["decoder"]["head_size"])
        found.update(score(lambda tokens: decoder.step(tokens, decoder.empty(), 0)[0], data))
    return found


def measure_gguf(path: Path, threads: int, data: dict, quality: bool) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=threads, n_threads_batch=threads,
                          logits_all=quality, verbose=False, n_batch=256)
    prompt = data["timing_prompt"]

    def generate():
        llm.reset()
        start = time.perf_counter_ns()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        first = (time.perf_counter_ns() - start) / 1e6
        samples = []
        for _ in range(DECODE_TOKENS):
            start = time.perf_counter_ns()
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            samples.append((time.perf_counter_ns() - start) / 1e6)
        return first, samples

    found = {} if quality else _speed(generate)
    if quality:
        def logits_of(tokens):
            llm.reset()
            llm.eval(tokens)
            return np.array(llm.scores[:len(tokens)])

        found.update(score(logits_of, data))
    return found


def child(args: argparse.Namespace) -> None:
    data = corpus(args.model_dir)
    measure = measure_gguf if args.artifact.endswith(".gguf") else measure_onnx
    found = measure(Path(args.artifact), args.child_threads, data, args.quality)
    # VmHWM, not getrusage: ru_maxrss survives exec, so a child started by this (torch-laden) script would report
    # the parent's peak
    high = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    found["peak_rss_mb"] = int(high.split()[1]) / 1024
    print(json.dumps(found))


def in_child(artifact: Path, threads: int, model_dir: Path, quality: bool) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(artifact), "--child-threads", str(threads),
                           "--model-dir", str(model_dir), *(["--quality"] if quality else [])],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ building the artifacts


def build_edgeops(model_dir: Path, work: Path, recipe: str, graph: Path | None = None) -> tuple[Path, float, dict]:
    """An artifact through edgeops' own pipeline (a scratch workspace whose manifest names ``recipe``); its
    directory holds the model and the genai_config.json edgeops renders for a 1-thread CPU device. ``graph``:
    a directory of onnxruntime-genai's builder output to start from instead of edgeops' export."""
    from edgeops.compress.cache import Cache
    from edgeops.compress.pipeline import build
    from edgeops.compress.request import BuildRequest
    from edgeops.generative.config import genai_config
    from edgeops.manifest.workspace import load_workspace
    from edgeops.release import make_release
    from edgeops.render import render_device
    from edgeops.targets import target_devices
    from labkit.repo import copy_repo

    root = copy_repo(work / "repo")
    shutil.copytree(model_dir, root / "examples" / "models" / "tiny_lm", dirs_exist_ok=True)  # inside the repo
    manifest = root / "manifests" / "assistant-lm.yaml"
    text = manifest.read_text().replace("    - quantize: {mode: auto}", f"    - {recipe}")
    if "auto" not in recipe:  # a fixed recipe: measured whatever its agreement (the table shows it)
        text = text.replace("    max_drop: 5 ", "    enforce: false\n    max_drop: 5 ")
    if graph is not None:
        shutil.copytree(graph, root / "examples" / "models" / "tiny_lm" / "builder")
        head = json.loads((graph / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
        text = text.replace("tiny_lm/model.onnx", "tiny_lm/builder/model.onnx")
        text = text.replace("  generation:\n", f"  generation:\n    head_dim: {head}\n")
    manifest.write_text(text)
    ws = load_workspace(root)
    doc = ws.deployments["assistant-lm"]
    started = time.monotonic()
    result = build(BuildRequest.of(doc, "cpu"), Cache(work / "cache"), force=True)
    seconds = time.monotonic() - started
    target = next(t for t in target_devices(ws, "assistant-lm"))
    release = make_release(doc.name, result.artifact, render_device(ws, doc, target, result.report["artifact"]))
    out = work / "artifact"
    out.mkdir()
    shutil.copyfile(result.artifact.model, out / "model.onnx")
    runtime = json.loads(next(f.content for f in release.files if f.name == "runtime.json"))
    (out / "genai_config.json").write_text(json.dumps(genai_config(runtime)))
    return out, seconds, result.report


def hf_checkpoint(model_dir: Path, out: Path) -> Path:
    """The trained weights as a Hugging Face Llama checkpoint with a byte-level tokenizer of the same ids."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    report = json.loads((model_dir / "report.json").read_text())["architecture"]
    weights = dict(np.load(model_dir / "weights.npz"))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=report["hidden"], intermediate_size=report["mlp"],
                         num_hidden_layers=report["layers"], num_attention_heads=report["heads"],
                         num_key_value_heads=report["kv_heads"], max_position_embeddings=256, rms_norm_eps=1e-6,
                         rope_theta=report["rope_base"], tie_word_embeddings=True, bos_token_id=BOS,
                         eos_token_id=EOS, pad_token_id=PAD, attention_bias=False, mlp_bias=False)
    renamed = {"model.embed_tokens.weight": weights["embed.weight"], "model.norm.weight": weights["norm.weight"]}
    for i in range(report["layers"]):
        block, layer = f"blocks.{i}.", f"model.layers.{i}."
        renamed[layer + "input_layernorm.weight"] = weights[block + "attention_norm.weight"]
        renamed[layer + "post_attention_layernorm.weight"] = weights[block + "mlp_norm.weight"]
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
            renamed[layer + f"self_attn.{theirs}.weight"] = weights[block + f"attention.{ours}.weight"]
        for name in ("gate", "up", "down"):
            renamed[layer + f"mlp.{name}_proj.weight"] = weights[block + f"{name}.weight"]
    model = LlamaForCausalLM(config)
    missing = model.load_state_dict({k: torch.from_numpy(v) for k, v in renamed.items()}, strict=False)
    assert set(missing.missing_keys) <= {"lm_head.weight"}, missing
    model.tie_weights()
    model.save_pretrained(out)
    alphabet = byte_alphabet()
    vocab = {alphabet[b]: b for b in range(256)} | {"<s>": BOS, "</s>": EOS, "<pad>": PAD}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out)
    return out


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character (what a ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def build_builder(checkpoint: Path, out: Path, precision: str = "int4") -> tuple[Path, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o",
                           str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "builder-cache")],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "builder failed")
    return out, time.monotonic() - started


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Rotary halves (Hugging Face's layout) to llama.cpp's interleaved pairs, as its converter does."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_files(model_dir: Path, work: Path) -> dict[str, tuple[Path, float]]:
    """F32 GGUF written from the weights, then Q4_0 and Q4_K_M by llama.cpp's quantizer (with wall times)."""
    import gguf
    import llama_cpp

    report = json.loads((model_dir / "report.json").read_text())["architecture"]
    weights = dict(np.load(model_dir / "weights.npz"))
    f32 = work / "tiny-lm-f32.gguf"
    writer = gguf.GGUFWriter(str(f32), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(report["hidden"])
    writer.add_block_count(report["layers"])
    writer.add_feed_forward_length(report["mlp"])
    writer.add_head_count(report["heads"])
    writer.add_head_count_kv(report["kv_heads"])
    writer.add_rope_dimension_count(report["hidden"] // report["heads"])
    writer.add_rope_freq_base(report["rope_base"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("none")
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_tensor("token_embd.weight", weights["embed.weight"])
    writer.add_tensor("output_norm.weight", weights["norm.weight"])
    names = {"attention.q": "attn_q", "attention.k": "attn_k", "attention.v": "attn_v", "attention.o": "attn_output",
             "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
    for i in range(report["layers"]):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", weights[f"blocks.{i}.attention_norm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", weights[f"blocks.{i}.mlp_norm.weight"])
        for ours, theirs in names.items():
            tensor = weights[f"blocks.{i}.{ours}.weight"]
            if ours == "attention.q":
                tensor = permute(tensor, report["heads"])
            elif ours == "attention.k":
                tensor = permute(tensor, report["kv_heads"])
            writer.add_tensor(f"blk.{i}.{theirs}.weight", np.ascontiguousarray(tensor))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = {"llama.cpp F32": (f32, 0.0)}
    for label, ftype in (("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0), ("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
        path = work / f"tiny-lm-{label}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        started = time.monotonic()
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize to {label}")
        out[f"llama.cpp {label}"] = (path, time.monotonic() - started)
    return out


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "examples" / "generated" / "tiny_lm")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--artifact", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quality", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.artifact = args.child
        child(args)
        return
    if not (args.model_dir / "weights.npz").exists():
        sys.exit(f"{args.model_dir}/weights.npz not found: run python examples/make_tiny_lm.py first")
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    artifacts: dict[str, dict] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgeops-bench-lm-") as tmp:
        work = Path(tmp)
        fp32 = work / "fp32"
        fp32.mkdir()
        for label, recipe in (("edgeops auto", "quantize: {mode: auto}"),
                              ("edgeops int4 (acc. level 4)", "quantize: {mode: weight_only, bits: 4, "
                                                              "accuracy_level: 4}"),
                              ("edgeops int4 (fp32 compute)", "quantize: {mode: weight_only, bits: 4, "
                                                              "accuracy_level: 1}")):
            print(f"building {label}", file=sys.stderr)
            scratch = work / label.replace(" ", "-").replace("(", "").replace(")", "").replace(".", "")
            scratch.mkdir()
            try:
                path, seconds, report = build_edgeops(args.model_dir, scratch, recipe)
            except Exception as exc:  # noqa: BLE001 - a recipe that misses the goal is a row, not a crash
                artifacts[label] = {"error": str(exc).splitlines()[0][:160]}
                continue
            artifacts[label] = {"path": path, "build_s": seconds, "size": (path / "model.onnx").stat().st_size}
            if label == "edgeops auto":
                chosen = report["stages"][-1]["notes"][0] if report["stages"][-1]["notes"] else ""
                notes.append(f"edgeops auto: {chosen[:300]}")
                original = report["stages"][0]
                shutil.copyfile(args.model_dir / "model.onnx", fp32 / "model.onnx")
                shutil.copyfile(path / "genai_config.json", fp32 / "genai_config.json")
                artifacts["edgeops fp32 (input)"] = {"path": fp32, "build_s": 0.0, "size": original["size_bytes"]}
        try:
            checkpoint = hf_checkpoint(args.model_dir, work / "hf")
            path, seconds = build_builder(checkpoint, work / "builder")
            onnx_files = [p for p in path.glob("*.onnx")]
            size = sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".onnx", ".data"))
            artifacts["onnxruntime-genai builder int4"] = {"path": path, "build_s": seconds, "size": size}
            assert onnx_files
            fp32_graph, _ = build_builder(checkpoint, work / "builder-fp32", "fp32")
            print("building edgeops auto from the builder's fp32 graph", file=sys.stderr)
            scratch = work / "edgeops-on-builder"
            scratch.mkdir()
            path, seconds, report = build_edgeops(args.model_dir, scratch, "quantize: {mode: auto}", fp32_graph)
            artifacts["edgeops auto on the builder's fp32 graph"] = {
                "path": path, "build_s": seconds, "size": (path / "model.onnx").stat().st_size}
            notes.append(f"edgeops auto on the builder's fp32 graph: {report['stages'][-1]['notes'][0][:300]}")
        except Exception as exc:  # noqa: BLE001
            artifacts["onnxruntime-genai builder int4"] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        try:
            for label, (path, seconds) in gguf_files(args.model_dir, work).items():
                artifacts[label] = {"path": path, "build_s": seconds, "size": path.stat().st_size}
        except Exception as exc:  # noqa: BLE001
            artifacts["llama.cpp"] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        for label, found in artifacts.items():
            if "path" not in found:
                continue
            for threads in args.threads:
                print(f"measuring {label}, {threads} thread(s)", file=sys.stderr)
                found[threads] = in_child(found["path"], threads, args.model_dir, quality=False)
            found["quality"] = in_child(found["path"], 1, args.model_dir, quality=True)
    rows = []
    for label, found in artifacts.items():
        if "path" not in found:
            rows.append([label, "—", "—", "—", *(["—", "—"] * len(args.threads)), "—", "—",
                         f"not built: {found['error']}"])
            continue
        first = found["quality"]
        speed = []
        for threads in args.threads:
            m = found[threads]
            speed += [f"{m['tokens_per_s']:.0f}", f"{m['ttft_ms']:.2f}"] if "tokens_per_s" in m else ["—", "—"]
        rows.append([label, f"{found['size'] / 1e6:.2f}", f"{first.get('perplexity', float('nan')):.4f}",
                     f"{first.get('agreement', float('nan')):.1f}", *speed,
                     f"{max(found[t].get('peak_rss_mb', 0) for t in args.threads):.0f}", f"{found['build_s']:.1f}",
                     "; ".join(m["error"] for m in (first, *(found[t] for t in args.threads)) if "error" in m)])
    header = ["artifact", "MB", "perplexity", "agreement %"]
    for threads in args.threads:
        header += [f"tok/s {threads}t", f"TTFT ms {threads}t"]
    header += ["peak RSS MB", "build s", "note"]
    print(f"\n{machine()}; commit {git_commit()}; host CPU; load per core at start {load:.2f}"
          + (" (busy: figures not claimed)" if load > 0.5 else ""))
    print(markdown_table(header, rows))
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
