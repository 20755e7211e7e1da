"""`LLM(speculative_config=...)`: a vLLM-like dict turned into EngineConfig fields and a draft.

    {"method": "ngram", "num_speculative_tokens": 12,
     "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    {"method": "draft_model", "num_speculative_tokens": 3, "model": "draft.gguf"}
    {"method": "draft_model", "num_speculative_tokens": 3, "quantization": "int4+embed"}
        (no "model": the self-draft, the target's own weights quantized)

Optional everywhere: "disable_by_batch_size" (no speculation in steps with more running
requests). A string is shorthand: "ngram", "self-int4", "self-int8" or "draft:<path>".
"""

from __future__ import annotations

# The speculative methods (vLLM's names), listed only here: EngineConfig checks against them.
NGRAM = "ngram"  # prompt lookup (proposers.NgramProposer)
DRAFT_MODEL = "draft_model"  # a draft model, or the target quantized (proposers.DraftModelProposer)
SPECULATIVE_METHODS = (NGRAM, DRAFT_MODEL)

KEYS = (
    "method",
    "num_speculative_tokens",
    "model",
    "quantization",
    "prompt_lookup_max",
    "prompt_lookup_min",
    "disable_by_batch_size",
)
# Prompt lookup: k caps the drafts of the strongest matches (a match of n tokens proposes up
# to 2**n, so k=12 is reached by 4-gram matches, which on the input-grounded benchmark accept
# ~7 of 12); a 13-token verify costs ~1.6 single-token decodes on the 2-core CPU, a verify of
# up to 5 tokens about one. An int4 self-draft step costs ~0.4 of a decode; at ~0.83
# acceptance k=4 and k=5 measured alike (1.52x / 1.55x open-ended), k=3 1.43x.
DEFAULT_K = {NGRAM: 12, DRAFT_MODEL: 4}
SHORTHANDS = ("ngram", "self-int4", "self-int8", "draft:<path>")


def normalize(spec) -> dict | None:
    """A speculative_config (dict, shorthand string or None) as a dict with every key."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec == "ngram":
            spec = {"method": NGRAM}
        elif spec in ("self-int4", "self-int8"):
            scheme = "int4+embed" if spec == "self-int4" else "int8+embed"
            spec = {"method": DRAFT_MODEL, "quantization": scheme}
        elif spec.startswith("draft:") and len(spec) > len("draft:"):
            spec = {"method": DRAFT_MODEL, "model": spec[len("draft:") :]}
        else:
            raise ValueError(
                f"speculative_config={spec!r} is invalid: allowed strings are {SHORTHANDS}"
            )
    if not isinstance(spec, dict):
        raise ValueError(
            f"speculative_config={spec!r} is invalid: allowed are None, a dict or one of {SHORTHANDS}"
        )
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise ValueError(f"speculative_config has unknown keys {unknown}; allowed are {KEYS}")
    method = spec.get("method")
    if method not in SPECULATIVE_METHODS:
        raise ValueError(
            f"speculative_config['method']={method!r} is invalid: allowed are {SPECULATIVE_METHODS}"
        )
    if method == NGRAM and (spec.get("model") or spec.get("quantization")):
        raise ValueError("speculative_config: 'model' and 'quantization' need method='draft_model'")
    out = {k: spec.get(k) for k in KEYS}
    if out["num_speculative_tokens"] is None:
        out["num_speculative_tokens"] = DEFAULT_K[method]
    return out


def engine_fields(spec: dict) -> dict:
    """EngineConfig keyword arguments for a normalized speculative_config."""
    fields = {
        "speculative_method": spec["method"],
        "num_speculative_tokens": spec["num_speculative_tokens"],
        "speculative_disable_by_batch_size": spec["disable_by_batch_size"],
    }
    if spec["prompt_lookup_max"] is not None:
        fields["ngram_prompt_lookup_max"] = spec["prompt_lookup_max"]
    if spec["prompt_lookup_min"] is not None:
        fields["ngram_prompt_lookup_min"] = spec["prompt_lookup_min"]
    return fields
