"""Width pruning: drop MLP channels and whole attention heads, making the matrices smaller.

Both are calibrated sequentially (`LayerwiseRunner`): layer i is scored on the outputs of the
already pruned layers 0..i-1, pruned, and its pruned output feeds layer i+1.

- MLP channel j of a layer contributes act_j * w_down[j, :] to the residual stream, where
  act = act_fn(x @ w_gate) * (x @ w_up) (silu for Llama, tanh-GELU for Gemma; Gemma's
  post-MLP norm acts on the whole D-vector, so it is kept as is). Its importance is mean_t |act_j| * ||w_down[j, :]||
  (activation-weighted, as in LLM-Pruner / Minitron's activation scores). The kept channels
  slice w_gate[:, keep], w_up[:, keep] and w_down[keep, :].
- Query head n contributes o_n @ wo[n] (its attention output times its rows of wo); its
  importance is mean_t ||o_n @ wo[n]||. Grouped-query structure is kept in one of two ways:
  `mode="kv_groups"` drops whole KV groups (a K/V head with its G query heads; a group scores
  the sum of its heads), `mode="per_group"` drops the same number of query heads from every
  group (all K/V heads stay). Either way N stays a multiple of K.

Every layer keeps the same number of channels and heads (different ones per layer), so the
config stays one number per field: `intermediate_size`, `num_heads`, `num_kv_heads`.
Gemma's per-head q/k norms (over H) and its attention scale (`query_pre_attn_scalar`, not N)
do not depend on how many heads remain, so the same slices apply to it.

A fraction that rounds to removing nothing is refused, naming the parameter: e.g.
Gemma-3-270M has one KV head, so `head_mode="kv_groups"` has no group it could drop (use
`"per_group"`, which drops query heads of that one group).
"""

from __future__ import annotations

import numpy as np

from jax_infer.config import ModelConfig
from jax_infer.prune.calibration import LayerwiseRunner, layer_names

HEAD_MODES = ("kv_groups", "per_group")


def _check_fraction(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} is invalid: must be a number in [0, 1)")


def kept_count(total: int, fraction: float, multiple: int = 1) -> int:
    """Units kept when `fraction` of `total` are removed, rounded to a multiple of `multiple`
    (at least one multiple, at most total)."""
    keep = int(round(total * (1.0 - fraction) / multiple)) * multiple
    return max(multiple, min(total, keep))


def mlp_channel_scores(p: dict, stats: dict) -> np.ndarray:
    """f32[F]: mean |silu(gate) * up| of each channel times the norm of its w_down row."""
    down_norm = np.linalg.norm(np.asarray(p["w_down"], np.float32), axis=1)
    return stats["mlp_act_abs"] * down_norm


def slice_mlp(p: dict, keep: np.ndarray) -> dict:
    keep = np.sort(np.asarray(keep))
    return {
        **p,
        "w_gate": p["w_gate"][:, keep],
        "w_up": p["w_up"][:, keep],
        "w_down": p["w_down"][keep, :],
    }


def _head_columns(heads: np.ndarray, head_dim: int) -> np.ndarray:
    return (np.asarray(heads)[:, None] * head_dim + np.arange(head_dim)[None, :]).reshape(-1)


def slice_heads(p: dict, keep_heads, keep_groups, head_dim: int) -> dict:
    """Keep query heads `keep_heads` and KV heads `keep_groups` (each ascending). The caller
    keeps the grouping consistent: query head n uses KV head n // G before and after."""
    q_cols = _head_columns(np.sort(keep_heads), head_dim)
    kv_cols = _head_columns(np.sort(keep_groups), head_dim)
    out = {
        **p,
        "wq": p["wq"][:, q_cols],
        "wk": p["wk"][:, kv_cols],
        "wv": p["wv"][:, kv_cols],
        "wo": p["wo"][q_cols, :],
    }
    if "bq" in p:
        out.update(bq=p["bq"][q_cols], bk=p["bk"][kv_cols], bv=p["bv"][kv_cols])
    return out


def choose_heads(
    scores: np.ndarray, num_kv_heads: int, fraction: float, mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """(kept query heads, kept KV heads), ascending, from per-query-head scores f32[N].

    Query head n belongs to KV group n // G (the layout `attend` assumes). After pruning, the
    kept query heads of each kept group are contiguous in the same order, so the grouping of
    the smaller model is again n // G'.
    """
    if mode not in HEAD_MODES:
        raise ValueError(f"mode={mode!r} is not supported: allowed are {HEAD_MODES}")
    n = len(scores)
    g = n // num_kv_heads
    by_group = np.asarray(scores).reshape(num_kv_heads, g)
    if mode == "kv_groups":
        k_keep = kept_count(num_kv_heads, fraction)
        groups = np.sort(np.argsort(-by_group.sum(axis=1), kind="stable")[:k_keep])
        heads = (groups[:, None] * g + np.arange(g)[None, :]).reshape(-1)
        return heads, groups
    g_keep = kept_count(g, fraction)
    heads = []
    for k in range(num_kv_heads):
        best = np.sort(np.argsort(-by_group[k], kind="stable")[:g_keep])
        heads.extend(k * g + best)
    return np.asarray(heads), np.arange(num_kv_heads)


def _check_heads_removable(config: ModelConfig, fraction: float, mode: str) -> None:
    """Refuse a head pruning that would remove nothing (the model cannot lose the unit that
    `mode` removes), rather than returning the model unchanged under a pruned name."""
    k, g = config.num_kv_heads, config.num_heads // config.num_kv_heads
    if mode == "kv_groups" and kept_count(k, fraction) == k:
        hint = (
            "; with one KV head use head_mode='per_group' (drops query heads of the group)"
            if k == 1 and g > 1
            else ""
        )
        raise ValueError(
            f"head_fraction={fraction!r} with head_mode='kv_groups' removes no KV group: the "
            f"model has num_kv_heads={k}, and at least one group stays{hint}"
        )
    if mode == "per_group" and kept_count(g, fraction) == g:
        raise ValueError(
            f"head_fraction={fraction!r} with head_mode='per_group' removes no query head: "
            f"each KV group has num_heads // num_kv_heads={g} query head(s) "
            f"(num_heads={config.num_heads}, num_kv_heads={k}), and at least one stays"
            + ("; use head_mode='kv_groups'" if g == 1 and k > 1 else "")
        )


def prune_width(
    params: dict,
    config: ModelConfig,
    tokens: np.ndarray,
    *,
    mlp_fraction: float = 0.0,
    head_fraction: float = 0.0,
    head_mode: str = "kv_groups",
    mlp_multiple: int = 8,
    batch_size: int = 4,
) -> tuple[dict, ModelConfig, dict]:
    """Remove `mlp_fraction` of each layer's MLP channels and `head_fraction` of its attention
    heads (or KV groups), by importance on calibration tokens. Returns (params, config, info);
    the new config's intermediate_size / num_heads / num_kv_heads match the new shapes."""
    _check_fraction("mlp_fraction", mlp_fraction)
    _check_fraction("head_fraction", head_fraction)
    if head_mode not in HEAD_MODES:
        raise ValueError(f"head_mode={head_mode!r} is not supported: allowed are {HEAD_MODES}")
    if not isinstance(mlp_multiple, int) or mlp_multiple < 1:
        raise ValueError(f"mlp_multiple={mlp_multiple!r} is invalid: must be an int >= 1")
    c = config
    f_keep = kept_count(c.intermediate_size, mlp_fraction, min(mlp_multiple, c.intermediate_size))
    if mlp_fraction > 0 and f_keep == c.intermediate_size:
        raise ValueError(
            f"mlp_fraction={mlp_fraction!r} removes no MLP channel: intermediate_size="
            f"{c.intermediate_size} rounded to a multiple of mlp_multiple={mlp_multiple} keeps "
            "all of them; give a larger fraction or a smaller mlp_multiple"
        )
    if head_fraction > 0:
        _check_heads_removable(c, head_fraction, head_mode)
    runner = LayerwiseRunner(params, config, tokens, batch_size=batch_size)
    out = dict(params)
    num_heads, num_kv = c.num_heads, c.num_kv_heads
    info = {"method": "width", "kept_heads": [], "kept_kv_heads": []}
    for name in layer_names(params):
        p = params[name]
        stats = runner.stats(p)
        if head_fraction > 0:
            heads, groups = choose_heads(
                stats["head_out"], c.num_kv_heads, head_fraction, head_mode
            )
            p = slice_heads(p, heads, groups, c.head_dim)
            num_heads, num_kv = len(heads), len(groups)
            info["kept_heads"].append([int(i) for i in heads])
            info["kept_kv_heads"].append([int(i) for i in groups])
        if f_keep < c.intermediate_size:
            keep = np.argsort(-mlp_channel_scores(p, stats), kind="stable")[:f_keep]
            p = slice_mlp(p, keep)
        out[name] = p
        runner.advance(p)
    new_config = c.replace(intermediate_size=f_keep, num_heads=num_heads, num_kv_heads=num_kv)
    info.update(
        mlp_fraction=mlp_fraction,
        head_fraction=head_fraction,
        head_mode=head_mode,
        intermediate_size=[c.intermediate_size, f_keep],
        num_heads=[c.num_heads, num_heads],
        num_kv_heads=[c.num_kv_heads, num_kv],
    )
    return out, new_config, info
