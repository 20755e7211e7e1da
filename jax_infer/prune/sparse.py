"""Unstructured and N:M (2:4) sparsity: weights set to zero, shapes unchanged.

These change quality only. No code path here skips zeros: on this CPU (XLA dense dots) a 50%
or 2:4 sparse model reads the same bytes and runs at the same speed as the dense one. The 2:4
pattern is what sparse tensor cores (NVIDIA Ampere and later) accelerate; elsewhere it is a
quality experiment.

Both criteria score each weight of a projection w [in, out] (the layer's seven projections;
the embedding and LM head are left dense, as in the papers):

- magnitude: |w|; unstructured sparsity removes the smallest per matrix.
- Wanda (Sun et al., "A Simple and Effective Pruning Approach for LLMs"): |w_ij| * ||x_i||_2,
  where ||x_i|| is the norm of input feature i over the calibration tokens; weights compete
  within each output (column j), and layers are pruned sequentially on the pruned model's
  activations.

`pattern` is "unstructured" (with `sparsity` in [0, 1)) or "N:M" such as "2:4": in every run of
M consecutive input weights of one output, the M - N lowest-scored are zeroed.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jax_infer.config import ModelConfig
from jax_infer.prune.calibration import LayerwiseRunner, layer_names

PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# The calibration statistic (sum of squares per input feature) feeding each projection.
INPUT_STAT = {
    "wq": "attn_in_sq",
    "wk": "attn_in_sq",
    "wv": "attn_in_sq",
    "wo": "attn_out_sq",
    "w_gate": "mlp_in_sq",
    "w_up": "mlp_in_sq",
    "w_down": "mlp_act_sq",
}
CRITERIA = ("magnitude", "wanda")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for "unstructured", else (n, m) for "n:m" with 0 < n < m."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(s) for s in pattern.split(":"))
    except ValueError:
        n = m = 0
    if not 0 < n < m:
        raise ValueError(
            f"pattern={pattern!r} is invalid: allowed are 'unstructured' or 'N:M' with "
            "0 < N < M, e.g. '2:4'"
        )
    return n, m


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """bool[in, out] keeping the n highest scores in each run of m consecutive inputs (axis 0)
    of each output column. in must be a multiple of m."""
    k_in, k_out = scores.shape
    if k_in % m:
        raise ValueError(f"input dimension {k_in} is not a multiple of m={m} for an {n}:{m} mask")
    groups = scores.reshape(k_in // m, m, k_out)
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return keep.reshape(k_in, k_out)


def unstructured_mask(scores: np.ndarray, sparsity: float, per_output: bool) -> np.ndarray:
    """bool mask keeping the highest-scored 1 - sparsity of the weights, compared within each
    output column (per_output) or across the whole matrix."""
    if per_output:
        k_in = scores.shape[0]
        drop = int(round(k_in * sparsity))
        order = np.argsort(scores, axis=0, kind="stable")
        keep = np.ones_like(scores, dtype=bool)
        np.put_along_axis(keep, order[:drop], False, axis=0)
        return keep
    flat = scores.reshape(-1)
    drop = int(round(flat.size * sparsity))
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:drop]] = False
    return keep.reshape(scores.shape)


def _mask(scores: np.ndarray, pattern, sparsity: float, per_output: bool) -> np.ndarray:
    if pattern is None:
        return unstructured_mask(scores, sparsity, per_output)
    return nm_mask(scores, *pattern)


def _apply(w, keep: np.ndarray):
    return jnp.where(jnp.asarray(keep), w, jnp.zeros((), w.dtype))


def prune_sparse(
    params: dict,
    config: ModelConfig,
    tokens: np.ndarray | None = None,
    *,
    criterion: str = "wanda",
    pattern: str = "unstructured",
    sparsity: float = 0.5,
    batch_size: int = 4,
) -> tuple[dict, ModelConfig, dict]:
    """Zero weights of every layer projection by `criterion` ("magnitude" or "wanda", which
    needs calibration tokens). Returns (params, the unchanged config, info with the achieved
    fraction of zeros)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is not supported: allowed are {CRITERIA}")
    nm = parse_pattern(pattern)
    if nm is None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} is invalid: must be in [0, 1)")
    if criterion == "wanda" and tokens is None:
        raise ValueError("criterion='wanda' needs calibration tokens; tokens=None")
    runner = (
        LayerwiseRunner(params, config, tokens, batch_size=batch_size)
        if criterion == "wanda"
        else None
    )
    out = dict(params)
    zeros = total = 0
    for name in layer_names(params):
        p = dict(params[name])
        stats = runner.stats(p) if runner is not None else None
        for proj in PROJECTIONS:
            w = np.asarray(p[proj], np.float32)
            scores = np.abs(w)
            if stats is not None:
                scores = scores * np.sqrt(stats[INPUT_STAT[proj]])[:, None]
            keep = _mask(scores, nm, sparsity, per_output=criterion == "wanda")
            p[proj] = _apply(p[proj], keep)
            zeros += int(keep.size - keep.sum())
            total += keep.size
        out[name] = p
        if runner is not None:
            runner.advance(p)
    info = {
        "method": "sparse",
        "criterion": criterion,
        "pattern": pattern,
        "sparsity_requested": sparsity if nm is None else 1.0 - nm[0] / nm[1],
        "sparsity_achieved": zeros / total,
        "note": "weights zeroed in place: same shapes, same bytes, no speed-up on this CPU",
    }
    return out, config, info
