"""Structured outputs: grammar-constrained decoding with llguidance, on the engine's side.

    so = StructuredOutputs(tokenizer, vocab_size)
    req.grammar = so.new_matcher(params.structured_outputs)   # ValueError for a bad grammar
    future = so.submit_masks(rows)                            # while the step's forward runs
    bitmask = future.result()                                 # i32[R, ceil(V/32)] for the sampler

Why it is shaped this way:

* The matcher (llguidance's `LLMatcher`, an Earley parser over the token trie) lives on the
  host and is per request. The scheduler's request record holds it behind one opaque
  attribute (`Request.grammar`, a `GrammarState`): `commit_tokens`, the one commit path,
  calls `accept(token)` for every token it appends, so plain decoding, speculative
  verification and the stop rules advance the matcher exactly by the committed tokens.
  Preemption keeps a request's output tokens (they are recomputed, not resampled), so the
  matcher state stays valid across it; rejected drafts were never committed, and the matcher
  steps taken to compute their masks are rolled back at once.
* Masks for step n are computed on a worker thread while step n's forward runs (the jitted
  step is dispatched asynchronously; llguidance computes a mask in Rust without the GIL),
  packed as llguidance's `i32[R, ceil(V/32)]` bitmask and applied inside the jitted sampler
  (`sampling.apply_token_bitmask`, a pure function of logits and bitmask).
* Compiling a grammar (schema -> llguidance grammar -> a matcher with its lexer) is done once
  per distinct constraint and cached; each request gets a `deep_copy` of the cached fresh
  matcher. The llguidance tokenizer is built from our tokenizer's backend (`tokenizers` JSON:
  byte-level or sentencepiece vocab, merges, eos) with the model's vocabulary size, so the
  bits cover the padded embedding rows too (never allowed).
* JSON schemas compile with compact separators (", " and ": ", no free whitespace): a small
  model left free whitespace can loop on newlines until max_tokens. A schema may override
  this with llguidance's "x-guidance" options.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Sequence

import numpy as np

from jax_infer.sampling import StructuredOutputsParams

# llguidance JSON options (overridable per schema with "x-guidance").
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Compiled matchers kept (LRU) per StructuredOutputs; a compile is ~1 ms to ~1 s.
CACHE_SIZE = 256


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ValueError(
            f"structured_outputs needs the llguidance package (pip install llguidance): {e}"
        ) from None
    return llguidance


def grammar_text(so: StructuredOutputsParams) -> str:
    """The llguidance grammar for a constraint (not yet checked: see `StructuredOutputs`)."""
    llg = _llguidance()
    m = llg.LLMatcher
    kind = so.kind
    if kind == "json":
        return m.grammar_from_json_schema(so.json, defaults=JSON_DEFAULTS)
    if kind == "json_object":
        return m.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
    if kind == "regex":
        return m.grammar_from_regex(so.regex)
    if kind == "choice":
        # Each choice a Lark string literal (JSON string syntax is Lark's).
        import json

        return m.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in so.choice))
    return m.grammar_from_lark(so.grammar)


class GrammarState:
    """One request's matcher, behind the interface `scheduler.request.commit_tokens` uses."""

    def __init__(self, matcher, eos_token_ids: frozenset[int]):
        self.matcher = matcher
        self.eos_token_ids = eos_token_ids

    def accept(self, token: int) -> str | None:
        """Advance by one committed token: None to go on, "stop" when the grammar is complete
        and nothing but eos may follow, else an error message (the token was not allowed:
        the sampler's mask was not applied, a bug)."""
        m = self.matcher
        if not m.consume_token(int(token)):
            return f"structured outputs: token {token} is not allowed here: {m.get_error()}"
        if m.is_stopped():
            return "stop"
        return None

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` (drafts) the grammar accepts in a row from here (no change)."""
        if not tokens:
            return 0
        return self.matcher.validate_tokens([int(t) for t in tokens])


class StructuredOutputs:
    """The llguidance tokenizer, the compiled-grammar cache and the mask worker of an engine.

    Thread-safe for `new_matcher` (the server checks grammars on its request threads)."""

    def __init__(self, tokenizer, vocab_size: int):
        llg = _llguidance()
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids)
        self.ll_tokenizer = llg.LLTokenizer(
            tokenizer.backend.to_str(),
            n_vocab=vocab_size,
            eos_token=sorted(self.eos_token_ids),
        )
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        # One worker: the masks of a step are computed together, in order.
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llg-mask")
        # Host time spent computing masks, and how many were computed (the benchmark reads it).
        self.mask_seconds = 0.0
        self.num_masks = 0
        self.num_compiles = 0

    def compile(self, so: StructuredOutputsParams):
        """A fresh matcher for `so`, from the cache or compiled now. ValueError naming the
        field and llguidance's reason for an invalid schema, regex or grammar."""
        key = (so.kind, getattr(so, so.kind))
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        llg = _llguidance()
        field = f"structured_outputs.{so.kind}"
        try:
            text = grammar_text(so)
        except ValueError as e:
            raise ValueError(f"{field} is invalid: {' '.join(str(e).split())}") from None
        matcher = llg.LLMatcher(self.ll_tokenizer, text, log_level=0)
        if matcher.is_error():
            # One line (llguidance draws a caret under the spot): it goes into a 400's message.
            reason = " ".join(matcher.get_error().split())
            raise ValueError(f"{field} is invalid: {reason}")
        with self._lock:
            self.num_compiles += 1
            self._cache[key] = matcher
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def new_matcher(self, so: StructuredOutputsParams) -> GrammarState:
        """A request's own matcher at the start of its output (raises as `compile`)."""
        return GrammarState(self.compile(so).deep_copy(), self.eos_token_ids)

    def submit_masks(self, rows: Sequence[tuple[GrammarState, Sequence[int]]]):
        """Start computing masks on the worker; returns a Future of i32[R, W] where row r of
        request i (in `rows` order) holds len(drafts_i) + 1 masks: at the current state, then
        after each draft. The matchers end where they began (drafts are rolled back)."""
        return self._worker.submit(self._masks, list(rows))

    def _masks(self, rows) -> np.ndarray:
        start = time.perf_counter()
        total = sum(len(d) + 1 for _, d in rows)
        bitmask = np.full((total, self.words), -1, np.int32)
        nbytes = self.words * 4
        offset = 0
        for state, drafts in rows:
            m = state.matcher
            # One matcher at a time on this thread (llguidance drops the GIL while it
            # computes). Not llguidance's LLExecutor: its worker threads spin while idle,
            # which on a small, busy CPU starved the model's own threads (32x slower steps).
            m.unsafe_compute_mask_ptr(bitmask[offset].ctypes.data, nbytes)
            consumed = 0
            for j, token in enumerate(drafts):
                if not m.consume_token(int(token)):
                    break  # drafts were cut to the valid prefix; a guard all the same
                consumed += 1
                m.unsafe_compute_mask_ptr(bitmask[offset + j + 1].ctypes.data, nbytes)
            if consumed:
                m.rollback(consumed)
            offset += len(drafts) + 1
        self.mask_seconds += time.perf_counter() - start
        self.num_masks += total
        return bitmask

    def close(self) -> None:
        self._worker.shutdown(wait=True)
