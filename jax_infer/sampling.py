"""Sampling parameters (vLLM-compatible) and a jitted, batched token sampler.

Why it is shaped this way:

* ``SamplingParams`` is the user-facing request knob set. It follows vLLM's field
  names and semantics so that OpenAI/vLLM clients behave the same here, and it
  validates eagerly on the host: a bad value fails at request submission with a
  message naming the field, not as NaNs deep inside a compiled step.
* The device side never branches on traced values. Per-row knobs travel as a
  pytree of ``[B]`` arrays (``SamplingMetadata``) so one compiled program serves
  any mix of requests, while a few hashable host-side switches (``SamplerFlags``)
  pick *which* program: an all-greedy batch compiles to penalties + argmax and
  never pays for sorting the vocabulary or drawing ``B x V`` random numbers.
* Randomness is per row: ``request_key(seed, step)`` is ``fold_in(key(seed), step)``,
  with one more fold for the speculative streams (``KeyPurpose``). A request's tokens
  therefore depend only on its own seed, step and logits, never on which other
  requests share the batch or on padding, which is what makes ``seed``
  reproducible under continuous batching.
* top-k / top-p / min-p are applied as one per-row *value threshold* on the
  temperature-scaled logits instead of masking a sorted copy and scattering it
  back. A threshold makes the kept set independent of how a sort orders ties,
  and it lets the top-k-only case use ``lax.top_k`` with a small static cap
  rather than a full sort of a ~50k vocabulary.

Kept-set definitions (``x`` = penalized logits divided by the row's temperature,
all in float32; a token is kept iff it passes every enabled filter):

* top-k (k >= 1): kept iff ``x_i >= x_(k)``, the k-th largest value (k clipped to
  V). Every token tied with the k-th value is kept, so more than k tokens can
  survive when there are ties at the boundary.
* top-p (p < 1): over the distribution ``softmax(x restricted to top-k)``, kept
  iff the total probability of tokens with a strictly greater value is ``< p``.
  Tied tokens are therefore kept or dropped together, and the arg-max token is
  always kept. (Equivalently: the smallest set of whole tie-groups, taken in
  descending order, whose mass reaches p.)
* min-p (m > 0): kept iff ``x_i >= max(x) + log(m)``, i.e. ``p_i >= m * p_max``
  evaluated in log space so tiny probabilities do not underflow. min-p is
  unaffected by top-k/top-p because they never remove the maximum and
  renormalization does not change probability ratios.

Greedy rows (temperature < 1e-5, as in vLLM) take ``argmax`` of the penalized
logits; argmax and the top-n logprobs break ties toward the lower token id.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Temperatures below this are treated as greedy (vLLM's _SAMPLING_EPS): dividing
# logits by a near-zero temperature overflows float32 and would yield NaNs.
GREEDY_TEMPERATURE_EPS = 1e-5

MAX_LOGPROBS = 20
_U32_MAX = 2**32 - 1
# OpenAI's range for a logit_bias value; +-100 amounts to forcing or banning a token.
MAX_LOGIT_BIAS = 100.0


def _invalid(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"SamplingParams.{field}={value!r} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python; a flag passed where a count is expected
    # is almost always a caller bug, so it is rejected.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _as_finite_float(value: Any) -> float | None:
    """``float(value)`` for a finite real number (not bool), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain a request's output to a language (vLLM's names); give exactly one field.

    json: a JSON schema (dict, or its JSON text); regex: a regular expression the whole output
    matches; choice: one of these strings, verbatim; grammar: a Lark grammar (llguidance's
    dialect: https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md); json_object:
    any JSON object. Checked here for shape only; the engine compiles the grammar when the
    request is added (`structured_outputs.py`) and refuses an invalid schema, regex or grammar
    with a ValueError naming the field and the compiler's reason: never accepted and ignored.

    Normalized so that equal constraints compare and hash equal: a json schema is stored as
    its JSON text (key order kept: it orders the output), choice as a tuple. Output ends with finish_reason
    "stop" as soon as the grammar accepts and can go no further (or at eos where it may go on,
    e.g. a regex `[a-z]+`); when max_tokens runs out first it ends with "length" and the text
    may be an incomplete prefix of a valid output (vLLM does the same): give max_tokens room,
    or bound the schema (maxLength, maxItems).
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        setattr_ = functools.partial(object.__setattr__, self)
        field = "StructuredOutputsParams"
        given = [k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"{field}: give exactly one of {_STRUCTURED_KINDS}; got {given or 'none'}"
            )
        if not _is_bool(self.json_object):
            raise ValueError(f"{field}.json_object={self.json_object!r} is invalid: a bool")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise ValueError(f"{field}.json is not valid JSON text: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError(
                    f"{field}.json={self.json!r:.80} is invalid: a JSON schema is an object "
                    "(dict) or a bool"
                )
            setattr_("json", json.dumps(schema))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{field}.{name}={value!r} is invalid: a non-empty str")
        if self.choice is not None:
            if (
                isinstance(self.choice, str)
                or not isinstance(self.choice, (list, tuple))
                or not self.choice
                or not all(isinstance(c, str) and c for c in self.choice)
            ):
                raise ValueError(
                    f"{field}.choice={self.choice!r} is invalid: a non-empty list of non-empty str"
                )
            setattr_("choice", tuple(self.choice))

    @property
    def kind(self) -> str:
        """Which field is set: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling knobs with vLLM semantics, validated on construction.

    Normalizations (so equal meanings compare and hash equal): numbers become
    plain ``int``/``float``; ``top_k=-1`` becomes ``0`` (both mean off); ``stop``
    given as a str or list and ``stop_token_ids`` given as a list become tuples.
    ``stop`` strings are matched by the engine on detokenized text and cannot be
    masked at the logits level; ``min_tokens`` only masks eos/stop_token_ids.
    ``seed`` must fit in uint32 because the device keeps it in a ``u32[B]`` array.

    ``n`` samples of one prompt share its KV pages; sample i draws from the seed
    ``(seed + i) % 2**32`` (``sample_seed``), so it equals a single request with that seed.
    ``logit_bias`` ({token id: bias in [-100, 100]}, OpenAI) is added to the logits before
    penalties and sampling (greedy too); it is normalized to a tuple of (id, bias) pairs
    sorted by id so that params stay hashable (``dict(p.logit_bias)`` gives the mapping).
    ``prompt_logprobs`` (k in [0, 20]): the logprob of every prompt token after the first
    plus the top k there, computed from the prefill logits (prefix-cache reuse is skipped
    for such a request so that every prompt position is computed).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    n: int = 1
    logit_bias: Any = None  # {token id: bias}; stored as tuple[tuple[int, float], ...]
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        setattr_ = functools.partial(object.__setattr__, self)

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise _invalid("max_tokens", self.max_tokens, "must be an int >= 1")
        setattr_("max_tokens", int(self.max_tokens))

        temperature = _as_finite_float(self.temperature)
        if temperature is None or temperature < 0:
            raise _invalid(
                "temperature", self.temperature, "must be a finite number >= 0 (0 means greedy)"
            )
        setattr_("temperature", temperature)

        if not _is_int(self.top_k) or not (self.top_k >= 1 or self.top_k in (0, -1)):
            raise _invalid("top_k", self.top_k, "must be an int: 0 or -1 (off) or >= 1")
        setattr_("top_k", max(int(self.top_k), 0))

        top_p = _as_finite_float(self.top_p)
        if top_p is None or not 0.0 < top_p <= 1.0:
            raise _invalid("top_p", self.top_p, "must be in (0, 1]")
        setattr_("top_p", top_p)

        min_p = _as_finite_float(self.min_p)
        if min_p is None or not 0.0 <= min_p <= 1.0:
            raise _invalid("min_p", self.min_p, "must be in [0, 1]")
        setattr_("min_p", min_p)

        repetition_penalty = _as_finite_float(self.repetition_penalty)
        if repetition_penalty is None or repetition_penalty <= 0:
            raise _invalid(
                "repetition_penalty", self.repetition_penalty, "must be a finite number > 0"
            )
        setattr_("repetition_penalty", repetition_penalty)

        for name in ("presence_penalty", "frequency_penalty"):
            raw = getattr(self, name)
            value = _as_finite_float(raw)
            if value is None or not -2.0 <= value <= 2.0:
                raise _invalid(name, raw, "must be in [-2, 2]")
            setattr_(name, value)

        if self.seed is not None:
            if not _is_int(self.seed) or not 0 <= self.seed <= _U32_MAX:
                raise _invalid("seed", self.seed, "must be None or an int in [0, 2**32 - 1]")
            setattr_("seed", int(self.seed))

        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise _invalid("stop", self.stop, "must be a str or a list/tuple of non-empty str")
        setattr_("stop", tuple(stop))

        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise _invalid(
                "stop_token_ids", self.stop_token_ids, "must be a list/tuple of ints >= 0"
            )
        setattr_("stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise _invalid(
                "min_tokens",
                self.min_tokens,
                f"must be an int in [0, max_tokens={self.max_tokens}]",
            )
        setattr_("min_tokens", int(self.min_tokens))

        if self.logprobs is not None:
            if not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise _invalid(
                    "logprobs", self.logprobs, f"must be None or an int in [0, {MAX_LOGPROBS}]"
                )
            setattr_("logprobs", int(self.logprobs))

        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            raw = getattr(self, name)
            if not _is_bool(raw):
                raise _invalid(name, raw, "must be a bool")
            setattr_(name, bool(raw))
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            raise _invalid("structured_outputs", so, "must be None or a StructuredOutputsParams")
        self._check_parallel_fields(setattr_)

    def _check_parallel_fields(self, setattr_) -> None:
        """Validate and normalize n, logit_bias and prompt_logprobs."""
        if not _is_int(self.n) or self.n < 1:
            raise _invalid("n", self.n, "must be an int >= 1")
        setattr_("n", int(self.n))
        if self.prompt_logprobs is not None:
            k = self.prompt_logprobs
            if not _is_int(k) or not 0 <= k <= MAX_LOGPROBS:
                raise _invalid(
                    "prompt_logprobs", k, f"must be None or an int in [0, {MAX_LOGPROBS}]"
                )
            setattr_("prompt_logprobs", int(k))
        bias = self.logit_bias
        if bias is None:
            return
        allowed = (
            "must be a mapping {token id (int >= 0): bias (a number in "
            f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}])}}"
        )
        try:
            items = list(bias.items()) if hasattr(bias, "items") else [tuple(e) for e in bias]
        except TypeError:
            raise _invalid("logit_bias", bias, allowed) from None
        pairs = {}
        for entry in items:
            if len(entry) != 2:
                raise _invalid("logit_bias", bias, allowed)
            token, value = entry
            v = _as_finite_float(value)
            if not _is_int(token) or token < 0 or v is None or abs(v) > MAX_LOGIT_BIAS:
                raise _invalid("logit_bias", bias, f"{allowed}; entry {token!r}: {value!r}")
            pairs[int(token)] = v
        setattr_("logit_bias", tuple(sorted(pairs.items())) or None)

    def sample_seed(self, base_seed: int, index: int) -> int:
        """The seed of sample `index` of `n` whose first sample has `base_seed` (the request's
        seed, or one the engine drew): ``(base_seed + index) % 2**32``, the server's rule."""
        return (base_seed + index) % 2**32

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS


class SamplingMetadata(NamedTuple):
    """Per-row sampling knobs for a batch of B rows; a pytree of ``[B]`` arrays.

    Invariant (established by ``build``): greedy and padding rows carry neutral
    filter values (top_k=0, top_p=1, min_p=0), so ``SamplerFlags.top_k_cap``,
    which is computed from the sampling rows only, bounds every row's top_k.
    """

    temperature: Any  # f32[B]; < GREEDY_TEMPERATURE_EPS means greedy
    top_k: Any  # i32[B]; 0 = off
    top_p: Any  # f32[B]; 1 = off
    min_p: Any  # f32[B]; 0 = off
    repetition_penalty: Any  # f32[B]; 1 = off
    presence_penalty: Any  # f32[B]; 0 = off
    frequency_penalty: Any  # f32[B]; 0 = off
    seed: Any  # u32[B]
    step: Any  # i32[B]; number of tokens this row has generated so far

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams | None],
        seeds: Sequence[int],
        steps: Sequence[int],
        pad_to: int,
    ) -> SamplingMetadata:
        """Host-side numpy metadata for ``len(params)`` live rows padded to ``pad_to``.

        ``seeds[i]`` is used as is: the engine passes ``params[i].seed`` when set
        and otherwise a seed it drew once for the request (kept across steps).
        None rows and padding rows are greedy with neutral penalties.
        """
        n = len(params)
        if len(seeds) != n or len(steps) != n:
            raise ValueError(
                f"SamplingMetadata.build: got {n} params, {len(seeds)} seeds and "
                f"{len(steps)} steps; they must have equal lengths"
            )
        if pad_to < n:
            raise ValueError(f"SamplingMetadata.build: pad_to={pad_to} is smaller than {n} rows")
        temperature = np.zeros(pad_to, np.float32)
        top_k = np.zeros(pad_to, np.int32)
        top_p = np.ones(pad_to, np.float32)
        min_p = np.zeros(pad_to, np.float32)
        repetition_penalty = np.ones(pad_to, np.float32)
        presence_penalty = np.zeros(pad_to, np.float32)
        frequency_penalty = np.zeros(pad_to, np.float32)
        seed = np.zeros(pad_to, np.uint32)
        step = np.zeros(pad_to, np.int32)
        for i, (p, s, t) in enumerate(zip(params, seeds, steps)):
            if not _is_int(s) or not 0 <= s <= _U32_MAX:
                raise ValueError(
                    f"SamplingMetadata.build: seeds[{i}]={s!r} must be in [0, 2**32 - 1]"
                )
            if not _is_int(t) or not 0 <= t < 2**31:
                raise ValueError(f"SamplingMetadata.build: steps[{i}]={t!r} must be in [0, 2**31)")
            seed[i] = s
            step[i] = t
            if p is None:
                continue
            repetition_penalty[i] = p.repetition_penalty
            presence_penalty[i] = p.presence_penalty
            frequency_penalty[i] = p.frequency_penalty
            if p.is_greedy:
                continue
            temperature[i] = p.temperature
            top_k[i] = p.top_k
            top_p[i] = p.top_p
            min_p[i] = p.min_p
        return cls(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            seed=seed,
            step=step,
        )


def _top_k_bucket(k: int) -> int:
    # Power-of-two buckets (>= 16) bound the number of compiled variants when
    # requests use many different top_k values.
    return max(16, 1 << (k - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
    """Static (hashable) switches for ``sample``; each distinct value compiles once.

    ``num_logprobs``: -1 = no top-n logprobs, else n in [0, 20].
    ``top_k_cap``: how top-k/top-p thresholds are found.
      -1: full sort of the vocabulary (needed when any row uses top-p; the safe
          default for hand-built flags);
       0: no row uses top-k or top-p (min-p needs only the row max);
      >0: no row uses top-p and every row's top_k <= top_k_cap, so
          ``lax.top_k(x, min(top_k_cap, V))`` replaces the sort.
    """

    all_greedy: bool
    use_top_k_top_p_min_p: bool
    use_penalties: bool
    num_logprobs: int
    top_k_cap: int = -1

    def __post_init__(self) -> None:
        if not -1 <= self.num_logprobs <= MAX_LOGPROBS:
            raise ValueError(
                f"SamplerFlags.num_logprobs={self.num_logprobs!r} is invalid: must be in [-1, {MAX_LOGPROBS}]"
            )
        if self.top_k_cap < -1:
            raise ValueError(f"SamplerFlags.top_k_cap={self.top_k_cap!r} is invalid: must be >= -1")

    @classmethod
    def for_batch(cls, params: Sequence[SamplingParams | None]) -> SamplerFlags:
        live = [p for p in params if p is not None]
        sampling = [p for p in live if not p.is_greedy]
        use_top_p = any(p.top_p < 1.0 for p in sampling)
        max_top_k = max((p.top_k for p in sampling), default=0)
        if use_top_p:
            top_k_cap = -1
        elif max_top_k > 0:
            top_k_cap = _top_k_bucket(max_top_k)
        else:
            top_k_cap = 0
        use_penalties = any(
            p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            for p in live
        )
        return cls(
            all_greedy=not sampling,
            use_top_k_top_p_min_p=use_top_p
            or max_top_k > 0
            or any(p.min_p > 0.0 for p in sampling),
            use_penalties=use_penalties,
            num_logprobs=max((p.logprobs for p in live if p.logprobs is not None), default=-1),
            top_k_cap=top_k_cap,
        )


class SamplerOutput(NamedTuple):
    token_ids: Any  # i32[B]
    logprob: Any  # f32[B]; log_softmax(raw logits)[token_ids]
    top_ids: Any  # i32[B, n]; n = max(num_logprobs, 0); descending, ties -> lower id
    top_logprobs: Any  # f32[B, n]


def min_tokens_banned_ids(
    params: Sequence[SamplingParams | None],
    num_generated: Sequence[int],
    eos_token_ids: int | Sequence[int] | None,
    pad_to: int,
) -> np.ndarray | None:
    """Token ids to ban for rows that have not yet produced ``min_tokens`` tokens.

    Returns i32[B, S] (B = pad_to) padded with -1, or None when no row needs a
    ban so the common case passes nothing. A small id list is used instead of a
    bool[B, V] mask because it is a few bytes per row to ship each step versus
    ~50k. Banned ids are the row's ``stop_token_ids`` plus the eos ids unless
    ``ignore_eos`` (then eos does not end the request, so it needs no ban).
    S is rounded up to a power of two to bound the number of compiled shapes.
    """
    if len(num_generated) != len(params) or pad_to < len(params):
        raise ValueError(
            f"min_tokens_banned_ids: {len(params)} params, {len(num_generated)} counts, "
            f"pad_to={pad_to}; counts must match params and pad_to >= len(params)"
        )
    if eos_token_ids is None:
        eos: tuple[int, ...] = ()
    elif _is_int(eos_token_ids):
        eos = (int(eos_token_ids),)
    else:
        eos = tuple(int(t) for t in eos_token_ids)
    rows: dict[int, list[int]] = {}
    for i, (p, n) in enumerate(zip(params, num_generated)):
        if p is None or n >= p.min_tokens:
            continue
        ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos))
        if ids:
            rows[i] = sorted(set(ids))
    if not rows:
        return None
    width = 1 << (max(len(v) for v in rows.values()) - 1).bit_length()
    out = np.full((pad_to, width), -1, np.int32)
    for i, ids in rows.items():
        out[i, : len(ids)] = ids
    return out


def apply_banned_ids(logits: jax.Array, banned_ids: jax.Array) -> jax.Array:
    """Set ``logits[b, banned_ids[b, s]]`` to -inf; ids < 0 are padding and ignored."""
    vocab = logits.shape[-1]
    # Negative indices would wrap around in JAX; map padding to V so that
    # mode="drop" discards it.
    ids = jnp.where(banned_ids < 0, vocab, banned_ids)  # i32[B, S]
    rows = jnp.arange(logits.shape[0])[:, None]  # i32[B, 1]
    return logits.at[rows, ids].set(-jnp.inf, mode="drop")


def logit_bias_arrays(
    params: Sequence[SamplingParams | None], pad_to: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids i32[B, S], biases f32[B, S]) of each row's logit_bias, padded with id -1, or None
    when no row has one. S is a power of two to bound the number of compiled shapes."""
    rows = {i: p.logit_bias for i, p in enumerate(params) if p is not None and p.logit_bias}
    if not rows:
        return None
    width = 1 << (max(len(v) for v in rows.values()) - 1).bit_length()
    ids = np.full((pad_to, width), -1, np.int32)
    vals = np.zeros((pad_to, width), np.float32)
    for i, pairs in rows.items():
        ids[i, : len(pairs)] = [t for t, _ in pairs]
        vals[i, : len(pairs)] = [b for _, b in pairs]
    return ids, vals


def apply_logit_bias(logits: jax.Array, bias: tuple[jax.Array, jax.Array]) -> jax.Array:
    """``logits[b, ids[b, s]] += biases[b, s]`` (from `logit_bias_arrays`); ids < 0 ignored."""
    ids, vals = bias
    ids = jnp.where(ids < 0, logits.shape[-1], ids)  # i32[B, S]; padding dropped below
    rows = jnp.arange(logits.shape[0])[:, None]  # i32[B, 1]
    return logits.at[rows, ids].add(vals.astype(logits.dtype), mode="drop")


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """Set the logits of tokens a packed bitmask forbids to -inf (structured outputs).

    logits f32[B, V]; bitmask i32[B, ceil(V/32)] in llguidance's layout: bit j (least
    significant first) of word w allows token 32 * w + j. A row of all ones (-1) allows every
    token, so unconstrained and padding rows pass through unchanged. A pure function of
    (logits, bitmask), applied inside the jitted sampler and verifier.
    """
    batch, vocab = logits.shape
    shifts = jnp.arange(32, dtype=jnp.uint32)
    words = bitmask.astype(jnp.uint32)[:, :, None]  # u32[B, W, 1]
    bits = jax.lax.shift_right_logical(words, shifts[None, None, :]) & 1  # u32[B, W, 32]
    allowed = bits.reshape(batch, -1)[:, :vocab] != 0  # bool[B, V]
    return jnp.where(allowed, logits, -jnp.inf)


def apply_penalties(
    logits: jax.Array,
    output_counts: jax.Array,
    prompt_mask: jax.Array,
    repetition_penalty: jax.Array,
    presence_penalty: jax.Array,
    frequency_penalty: jax.Array,
) -> jax.Array:
    """vLLM penalties, in vLLM's order: repetition, then frequency, then presence.

    logits f32[B, V]; output_counts i32[B, V]; prompt_mask bool[B, V]; penalties f32[B].
    Repetition (HF/vLLM) covers tokens seen in the prompt OR the output: positive
    logits are divided by the penalty, the others multiplied, so a penalty > 1
    always makes a seen token less likely. Frequency and presence (OpenAI)
    cover output tokens only: ``l -= f * count; l -= p * (count > 0)``.
    Neutral values (1, 0, 0) leave logits bit-identical.
    """
    output_seen = output_counts > 0  # bool[B, V]
    seen = prompt_mask | output_seen  # bool[B, V]
    rep = repetition_penalty[:, None]  # f32[B, 1]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalized, logits)
    logits = logits - frequency_penalty[:, None] * output_counts.astype(logits.dtype)
    return logits - presence_penalty[:, None] * output_seen.astype(logits.dtype)


def _filter_logits(
    x: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array, *, top_k_cap: int
) -> jax.Array:
    """Mask (to -inf) tokens outside the top-k / top-p / min-p kept set.

    x f32[B, V] is temperature-scaled; see the module docstring for the exact
    kept-set definitions. Returns f32[B, V]. The row maximum always survives.
    """
    batch, vocab = x.shape
    neg_inf = jnp.full((batch,), -jnp.inf, x.dtype)  # f32[B]
    k = jnp.clip(top_k, 0, vocab)  # i32[B]; 0 = off
    if top_k_cap == 0:
        threshold = neg_inf
    elif top_k_cap > 0:
        cap = min(top_k_cap, vocab)
        top_vals, _ = jax.lax.top_k(x, cap)  # f32[B, cap], descending
        kth = jnp.take_along_axis(top_vals, jnp.clip(k, 1, cap)[:, None] - 1, axis=-1)[:, 0]
        threshold = jnp.where(k > 0, kth, neg_inf)
    else:
        desc = jnp.flip(jnp.sort(x, axis=-1), axis=-1)  # f32[B, V], descending
        kth = jnp.take_along_axis(desc, jnp.clip(k, 1, vocab)[:, None] - 1, axis=-1)[:, 0]
        threshold_k = jnp.where(k > 0, kth, neg_inf)  # f32[B]
        desc_k = jnp.where(desc >= threshold_k[:, None], desc, -jnp.inf)  # f32[B, V]
        probs = jax.nn.softmax(desc_k, axis=-1)  # f32[B, V]
        # Exclusive prefix sums built by shifting the inclusive ones (not by
        # subtracting) so they stay monotone in float; monotone => the positions
        # with mass_before < top_p form a prefix, whose last value is the
        # threshold. Comparing values (>=) then keeps the whole tie-group.
        inclusive = jnp.cumsum(probs, axis=-1)  # f32[B, V]
        mass_before = jnp.concatenate([jnp.zeros((batch, 1), x.dtype), inclusive[:, :-1]], axis=-1)
        # >= 1 for any valid top_p > 0; the clamp guards hand-built metadata.
        num_kept = jnp.maximum(jnp.sum(mass_before < top_p[:, None], axis=-1), 1)  # i32[B]
        last_kept = jnp.take_along_axis(desc_k, num_kept[:, None] - 1, axis=-1)[:, 0]
        # top_p == 1 is forced off: rounding can push the cumulative mass to 1
        # before the tail and would otherwise drop tiny-probability tokens. The
        # max() also covers last_kept = -inf (prefix ran into the top-k mask).
        threshold_p = jnp.where(top_p < 1.0, last_kept, neg_inf)
        threshold = jnp.maximum(threshold_k, threshold_p)
    # min_p == 0 gives log(0) = -inf, i.e. off, without a branch.
    threshold_min_p = jnp.max(x, axis=-1) + jnp.log(min_p)  # f32[B]
    threshold = jnp.maximum(threshold, threshold_min_p)
    return jnp.where(x >= threshold[:, None], x, -jnp.inf)


class KeyPurpose(enum.IntEnum):
    """What a request's random numbers at a step are for. Each purpose is its own stream, so
    e.g. a verify step and a plain sampling step never share random numbers. The value is
    the salt folded into the key after the step; SAMPLE folds none, so plain sampling keeps
    the key ``fold_in(key(seed), step)`` it always had (and seeded outputs stay the same)."""

    SAMPLE = 0  # the sampler's one token per row (sample())
    VERIFY = 1  # speculative acceptance and the correction/bonus token (speculative/rejection.py)
    DRAFT = 2  # a draft model's proposals, one index per draft (speculative/proposers.py)


def request_key(
    seed: jax.Array,
    step: jax.Array,
    purpose: KeyPurpose = KeyPurpose.SAMPLE,
    index: jax.Array | int | None = None,
) -> jax.Array:
    """The PRNG key of one request (seed, step i32[]) for `purpose` (static): every random
    draw of the stack comes from here, so a request's tokens depend only on its own seed and
    step. index: a further fold for several keys of one purpose in a step (the draft index).
    """
    key = jax.random.fold_in(jax.random.key(seed), step)
    if purpose != KeyPurpose.SAMPLE:
        key = jax.random.fold_in(key, int(purpose))
    if index is not None:
        key = jax.random.fold_in(key, index)
    return key


def _categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    return jax.random.categorical(key, logits)


def argmax_last(x):
    """jnp.argmax(x, axis=-1) as i32, ties and NaN alike (the lowest index of the maximum; a
    NaN counts as the maximum), by two plain reductions: a max, then the smallest index
    holding it. XLA:CPU runs jnp.argmax's (value, index) reduction as scalar code, ~5x slower
    on a [1, 49152] row (0.2 ms of every decode step) and ~3x at 32 rows."""
    m = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    hit = (x == m) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, iota, x.shape[-1]), axis=-1)


@functools.partial(jax.jit, static_argnames=("flags",))
def sample(
    logits: jax.Array,
    meta: SamplingMetadata,
    output_counts: jax.Array,
    prompt_mask: jax.Array,
    *,
    flags: SamplerFlags,
    banned_ids: jax.Array | None = None,
    logit_bias: tuple[jax.Array, jax.Array] | None = None,
    bitmask: jax.Array | None = None,
) -> SamplerOutput:
    """Pick one token per row.

    logits f32[B, V] (raw model output); output_counts i32[B, V] (how often each
    token was generated so far); prompt_mask bool[B, V] (token occurs in the
    prompt); banned_ids i32[B, S] or None (from ``min_tokens_banned_ids``); bitmask
    i32[B, ceil(V/32)] or None: the tokens structured outputs allow (``apply_token_bitmask``).

    Order (vLLM): raw logprobs -> grammar bitmask -> banned ids -> penalties -> greedy: argmax;
    other rows: temperature -> top-k -> top-p -> min-p -> categorical with the
    row's key ``request_key(seed, step)``. Every step is row-local, so a row's
    output does not depend on the other rows or on padding.
    """
    logits = logits.astype(jnp.float32)
    batch = logits.shape[0]

    # Raw logprobs (before any processing), computed the way jax.nn.log_softmax
    # does but without materializing B x V: only gathered entries are needed.
    row_max = jnp.max(logits, axis=-1, keepdims=True)  # f32[B, 1]
    log_norm = jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=-1, keepdims=True))  # f32[B, 1]

    x = logits
    if bitmask is not None:
        x = apply_token_bitmask(x, bitmask)
    if banned_ids is not None:
        x = apply_banned_ids(x, banned_ids)
    if logit_bias is not None:
        x = apply_logit_bias(x, logit_bias)
    if flags.use_penalties:
        x = apply_penalties(
            x,
            output_counts,
            prompt_mask,
            meta.repetition_penalty,
            meta.presence_penalty,
            meta.frequency_penalty,
        )
    greedy_ids = argmax_last(x)  # i32[B]

    if flags.all_greedy:
        token_ids = greedy_ids
    else:
        is_greedy = meta.temperature < GREEDY_TEMPERATURE_EPS  # bool[B]
        temperature = jnp.where(is_greedy, 1.0, meta.temperature).astype(jnp.float32)
        scaled = x / temperature[:, None]  # f32[B, V]
        if flags.use_top_k_top_p_min_p:
            scaled = _filter_logits(
                scaled, meta.top_k, meta.top_p, meta.min_p, top_k_cap=flags.top_k_cap
            )
        keys = jax.vmap(request_key)(meta.seed, meta.step)
        sampled = jax.vmap(_categorical)(keys, scaled).astype(jnp.int32)  # i32[B]
        token_ids = jnp.where(is_greedy, greedy_ids, sampled)

    picked = jnp.take_along_axis(logits, token_ids[:, None], axis=-1)  # f32[B, 1]
    logprob = ((picked - row_max) - log_norm)[:, 0]  # f32[B]

    n = max(flags.num_logprobs, 0)
    if n > 0:
        top_vals, top_ids = jax.lax.top_k(logits, n)  # f32[B, n], i32[B, n]
        top_logprobs = (top_vals - row_max) - log_norm
    else:
        top_ids = jnp.zeros((batch, 0), jnp.int32)
        top_logprobs = jnp.zeros((batch, 0), jnp.float32)
    return SamplerOutput(token_ids, logprob, top_ids.astype(jnp.int32), top_logprobs)


@jax.jit
def update_output_counts(
    output_counts: jax.Array, token_ids: jax.Array, active: jax.Array
) -> jax.Array:
    """output_counts i32[B, V] += one-hot(token_ids i32[B]) for rows where active bool[B]."""
    rows = jnp.arange(output_counts.shape[0])  # i32[B]
    return output_counts.at[rows, token_ids].add(active.astype(output_counts.dtype), mode="drop")


@functools.partial(jax.jit, static_argnames=("k",))
def token_logprobs(logits: jax.Array, token_ids: jax.Array, *, k: int):
    """Raw logprobs of given tokens (prompt_logprobs): logits f32[M, V], token_ids i32[M] ->
    (logprob f32[M], top_ids i32[M, k], top_logprobs f32[M, k]); top ids descending, ties
    toward the lower id, as the sampler's top-n logprobs."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # f32[M, V]
    picked = jnp.take_along_axis(logp, token_ids[:, None], axis=-1)[:, 0]  # f32[M]
    top_vals, top_ids = jax.lax.top_k(logp, k)  # f32[M, k], i32[M, k]
    return picked, top_ids.astype(jnp.int32), top_vals
