"""Tokenizers, evaluation texts and golden prompts of a text-generation deployment."""

from __future__ import annotations

import json
from dataclasses import dataclass

from edgeops.compress.request import BuildRequest
from edgeops.manifest.yamlload import Loc

EVALUATION_TEXTS = 64  # passages of the evaluation text scored for perplexity (and shipped in the golden set)


@dataclass(frozen=True)
class ByteTokenizer:
    """A byte-level vocabulary: token = byte (0-255), then the special tokens."""

    vocab_size: int
    bos: int
    eos: int
    pad: int

    def encode(self, text: str, *, end: bool = False) -> list[int]:
        return [self.bos, *text.encode("utf-8"), *([self.eos] if end else [])]


@dataclass(frozen=True)
class Corpus:
    """What a generative build is measured on: golden prompts and held-out texts, as token ids."""

    tokenizer: ByteTokenizer
    prompts: list[list[int]]
    texts: list[list[int]]
    calibration: list[list[int]]


def _read(request: BuildRequest, relative: str, loc: Loc, what: str) -> str:
    path = request.source.resolve(relative)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise request.source.error(loc, f"{what} not found: {relative}") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise request.source.error(loc, f"{relative} is not readable UTF-8 text ({exc})") from None


def load_tokenizer(request: BuildRequest, relative: str) -> ByteTokenizer:
    loc: Loc = ("spec", "generation", "tokenizer")
    try:
        found = json.loads(_read(request, relative, loc, "tokenizer"))
        if found.get("kind") != "bytes":
            raise ValueError(f"kind {found.get('kind')!r}: only byte-level tokenizers (kind: bytes) are read here")
        tokenizer = ByteTokenizer(int(found["vocab_size"]), int(found["bos"]), int(found["eos"]), int(found["pad"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise request.source.error(loc, f"{relative} is not a tokenizer edgeops reads ({exc})") from None
    if tokenizer.vocab_size < 256 or min(tokenizer.bos, tokenizer.eos, tokenizer.pad) < 256:
        raise request.source.error(loc, f"{relative}: a byte-level vocabulary has the 256 bytes first, then its "
                                        "special tokens")
    return tokenizer


def _lines(request: BuildRequest, relative: str, loc: Loc, what: str) -> list[str]:
    lines = [line for line in _read(request, relative, loc, what).splitlines() if line.strip()]
    if not lines:
        raise request.source.error(loc, f"{relative} has no text")
    return lines


def load_corpus(request: BuildRequest) -> Corpus:
    """The golden prompts, evaluation texts and calibration texts of ``request``, tokenized."""
    generation = request.generation
    assert generation is not None
    tokenizer = load_tokenizer(request, generation.tokenizer)
    prompts = _lines(request, generation.prompts, ("spec", "generation", "prompts"), "golden prompts")
    texts = _lines(request, request.data.evaluation, ("spec", "data", "evaluation"), "evaluation text")
    texts = texts[:EVALUATION_TEXTS]
    calibration = _lines(request, request.data.calibration, ("spec", "data", "calibration"), "calibration text")
    return Corpus(tokenizer, [tokenizer.encode(p) for p in prompts],
                  [tokenizer.encode(t, end=True) for t in texts], [tokenizer.encode(t, end=True) for t in calibration])
