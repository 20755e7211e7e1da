"""Depth pruning: remove the decoder layers that change the hidden state least.

Two published scores, both computed from the hidden states x_0 (the embedding) .. x_L (the last
layer's output) of the calibration text, per token t and then averaged over tokens:

- angular distance (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"):
  d(x_l, x_m) = arccos(cos(x_l[t], x_m[t])) / pi. A contiguous block of n layers l..l+n-1 is
  removed where d(x_l, x_{l+n}) is smallest: the block as a whole maps its input to a nearly
  parallel output.
- Block Influence (ShortGPT): BI_l = 1 - cos(x_l[t], x_{l+1}[t]); the n layers with the
  lowest BI are removed, contiguous or not.

`layer_distances` returns both as [L+1, L+1] matrices so one calibration pass serves every n;
`select_layers` picks, `remove_layers` drops and renumbers (a pure transform of params and
config). The residual stream is unchanged by removal in shape, so the result is an ordinary,
smaller model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_infer.config import ModelConfig
from jax_infer.prune.calibration import LayerwiseRunner, layer_names

METRICS = ("angular", "bi")


@dataclasses.dataclass(frozen=True)
class LayerDistances:
    """angular[l, m]: mean over tokens of arccos(cos(x_l, x_m)) / pi, in [0, 1].
    one_minus_cos[l, m]: mean over tokens of 1 - cos(x_l, x_m) (BI_l = one_minus_cos[l, l+1])."""

    angular: np.ndarray  # f64[L+1, L+1]
    one_minus_cos: np.ndarray  # f64[L+1, L+1]

    @property
    def num_layers(self) -> int:
        return self.angular.shape[0] - 1


@jax.jit
def _pair_sums(states):
    """states [S, B, T, D] -> (sum of arccos/pi, sum of 1 - cos) over tokens, each [S, S]."""
    x = states.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-20)
    cos = jnp.clip(jnp.einsum("lbtd,mbtd->lmbt", x, x), -1.0, 1.0)
    return jnp.sum(jnp.arccos(cos), axis=(2, 3)) / jnp.pi, jnp.sum(1.0 - cos, axis=(2, 3))


def layer_distances(
    params: dict, config: ModelConfig, tokens: np.ndarray, *, batch_size: int = 4
) -> LayerDistances:
    """Angular distance and 1 - cos between every pair of hidden states x_0..x_L on tokens
    i32[num_seqs, seq_len] (calibration text)."""
    runner = LayerwiseRunner(params, config, tokens, batch_size=batch_size)
    states = [list(runner.hidden)]
    for name in layer_names(params):
        runner.advance(params[name])
        states.append(list(runner.hidden))
    ang = np.zeros((len(states), len(states)))
    omc = np.zeros_like(ang)
    for b in range(len(states[0])):
        a, o = _pair_sums(jnp.stack([s[b] for s in states]))
        ang += np.asarray(a, np.float64)
        omc += np.asarray(o, np.float64)
    return LayerDistances(ang / runner.num_tokens, omc / runner.num_tokens)


def select_layers(
    distances: LayerDistances,
    num_remove: int,
    *,
    metric: str = "angular",
    contiguous: bool = True,
) -> list[int]:
    """Indices of the layers to remove, ascending.

    contiguous: the block l..l+n-1 minimizing metric(x_l, x_{l+n}) (Gromov et al.);
    otherwise the n layers with the smallest single-layer score metric(x_l, x_{l+1}) (ShortGPT).
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not supported: allowed are {METRICS}")
    num_layers = distances.num_layers
    if not isinstance(num_remove, int) or not 0 <= num_remove < num_layers:
        raise ValueError(
            f"num_remove={num_remove!r} is invalid: must be an int in [0, {num_layers - 1}] "
            f"(the model has {num_layers} layers and must keep one)"
        )
    if num_remove == 0:
        return []
    m = distances.angular if metric == "angular" else distances.one_minus_cos
    if contiguous:
        scores = [m[start, start + num_remove] for start in range(num_layers - num_remove + 1)]
        start = int(np.argmin(scores))
        return list(range(start, start + num_remove))
    single = np.array([m[i, i + 1] for i in range(num_layers)])
    return sorted(int(i) for i in np.argsort(single, kind="stable")[:num_remove])


def remove_layers(params: dict, config: ModelConfig, drop) -> tuple[dict, ModelConfig]:
    """params and config without the layers in `drop`; the rest are renumbered from 0 in
    order. Other entries (embed, final_norm, lm_head) are shared, not copied."""
    names = layer_names(params)
    if len(names) != config.num_layers:
        raise ValueError(
            f"params have {len(names)} layers but config.num_layers={config.num_layers}"
        )
    drop = sorted(set(int(i) for i in drop))
    bad = [i for i in drop if not 0 <= i < config.num_layers]
    if bad:
        raise ValueError(f"drop={bad} is out of range: layers are 0..{config.num_layers - 1}")
    if len(drop) >= config.num_layers:
        raise ValueError(f"drop={drop} removes every layer: at least one must stay")
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    kept = [i for i in range(config.num_layers) if i not in drop]
    for new, old in enumerate(kept):
        out[f"layers_{new}"] = params[f"layers_{old}"]
    # Kept layers keep their kind (sliding window or global, and its RoPE).
    types = config.layer_types
    if types is not None:
        types = tuple(types[i] for i in kept)
    return out, config.replace(num_layers=len(kept), layer_types=types)


def prune_layers(
    params: dict,
    config: ModelConfig,
    tokens: np.ndarray,
    fraction: float,
    *,
    metric: str = "angular",
    contiguous: bool = True,
    batch_size: int = 4,
) -> tuple[dict, ModelConfig, dict]:
    """Remove round(fraction * L) layers chosen on tokens. Returns (params, config, info) where
    info records the removed layers and their scores (JSON-able)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction={fraction!r} is invalid: must be in [0, 1)")
    n = int(round(fraction * config.num_layers))
    dist = layer_distances(params, config, tokens, batch_size=batch_size)
    drop = select_layers(dist, n, metric=metric, contiguous=contiguous)
    m = dist.angular if metric == "angular" else dist.one_minus_cos
    info = {
        "method": "layers",
        "metric": metric,
        "contiguous": contiguous,
        "removed_layers": drop,
        "single_layer_scores": [float(m[i, i + 1]) for i in range(config.num_layers)],
    }
    if contiguous and drop:
        info["block_score"] = float(m[drop[0], drop[-1] + 1])
    new_params, new_config = remove_layers(params, config, drop)
    return new_params, new_config, info
