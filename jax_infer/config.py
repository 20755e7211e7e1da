"""Architecture description of a decoder: the Llama family and Gemma 2/3.

`ModelConfig` is a frozen, hashable dataclass so that it can be a static argument of
`jax.jit`: every number that decides an array shape or a code path lives here and nowhere
else. Presets are plain constants; `from_hf_config` and `from_gguf` translate the two
on-disk descriptions we load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

# HF `architectures` / GGUF `general.architecture` names we can run, mapped to our family tag.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
}
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma2", "gemma3")
GEMMA_FAMILIES = ("gemma2", "gemma3")
ACTIVATIONS = ("silu", "gelu_tanh")
# HF `hidden_activation` / `hidden_act` names -> ours.
HF_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling ("llama3") or plain "linear" scaling."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("llama3", "linear"):
            raise ValueError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported: "
                "allowed are 'llama3' and 'linear'"
            )
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor={self.factor} must be > 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every architectural number of a Llama-family decoder (dimension letters in comments)."""

    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    sliding_window: int | None = None  # Mistral: attend to at most this many previous tokens
    # Per-layer attention kind (HF's names): "sliding_attention" layers use `sliding_window`,
    # "full_attention" layers attend to everything. None: every layer uses `sliding_window`
    # (None there too means full attention everywhere). See `layer_windows`.
    layer_types: tuple[str, ...] | None = None
    family: str = "llama"
    # -- what Gemma 2/3 change; the defaults are Llama's, so a Llama config names none of them.
    hidden_act: str = "silu"  # the MLP gate's activation: "silu" or "gelu_tanh" (GeGLU)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w): Gemma stores w - 1
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs before the residual
    qk_norm: bool = False  # RMSNorm over head_dim on each query and key head, before RoPE
    embed_scale: float = 1.0  # embeddings multiplied by this (Gemma: sqrt(hidden_size))
    # Attention scores scale by query_pre_attn_scalar**-0.5 instead of head_dim**-0.5.
    query_pre_attn_scalar: float | None = None
    # RoPE base of the "sliding_attention" layers (Gemma 3's rope_local_base_freq, unscaled);
    # None: every layer uses rope_theta and rope_scaling.
    rope_local_theta: float | None = None
    attn_logit_softcapping: float | None = None  # scores -> c * tanh(scores / c) (Gemma 2)
    final_logit_softcapping: float | None = None  # logits -> c * tanh(logits / c)

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name}={value!r} is invalid: must be an int >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"ModelConfig.hidden_act={self.hidden_act!r} is not supported: allowed are "
                f"{ACTIVATIONS}"
            )
        for name in (
            "query_pre_attn_scalar",
            "rope_local_theta",
            "attn_logit_softcapping",
            "final_logit_softcapping",
        ):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"ModelConfig.{name}={value!r} must be None or > 0")
        if not self.embed_scale > 0:
            raise ValueError(f"ModelConfig.embed_scale={self.embed_scale!r} must be > 0")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"ModelConfig.sliding_window={self.sliding_window} must be >= 1")
        if self.layer_types is not None:
            # Lists (from JSON) become tuples so the config stays hashable (a jit static arg).
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad or len(self.layer_types) != self.num_layers:
                raise ValueError(
                    f"ModelConfig.layer_types={self.layer_types!r} is invalid: must be "
                    f"{self.num_layers} (num_layers) entries, each one of {LAYER_TYPES}"
                )
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError(
                    "ModelConfig.layer_types has 'sliding_attention' layers but "
                    "sliding_window=None: give the window size"
                )

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's attention window: an int W (a query attends to the last W positions up
        to its own) or None (full causal attention). The one place the model, the attention
        kernels and the KV-cache manager read a layer's window from."""
        if self.layer_types is None:
            return (self.sliding_window,) * self.num_layers
        return tuple(
            self.sliding_window if t == "sliding_attention" else None for t in self.layer_types
        )

    @property
    def layer_rope_local(self) -> tuple[bool, ...]:
        """Per layer: True where it takes the local RoPE (`rope_local_theta`, unscaled)."""
        if self.rope_local_theta is None:
            return (False,) * self.num_layers
        return tuple(w is not None for w in self.layer_windows)

    @property
    def query_scale(self) -> float:
        """Factor on q so that attention's own 1/sqrt(head_dim) gives the configured scale
        query_pre_attn_scalar**-0.5 (1.0 when unset): kernels need no extra argument."""
        if self.query_pre_attn_scalar is None:
            return 1.0
        return math.sqrt(self.head_dim / self.query_pre_attn_scalar)

    @property
    def group_size(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Parameter count, counting a tied embedding once."""
        d, f = self.hidden_size, self.intermediate_size
        qkv = d * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        if self.attention_bias:
            qkv += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        per_layer = qkv + self.num_heads * self.head_dim * d + 3 * d * f + 2 * d
        per_layer += 2 * d * self.post_norms + 2 * self.head_dim * self.qk_norm
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    # -- translations from on-disk descriptions ------------------------------------------

    @classmethod
    def from_hf_config(cls, config: dict | str | os.PathLike) -> ModelConfig:
        """From an HF `config.json` (a dict, the file, or its directory)."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"HF config not found: {path!r}")
            with open(path) as f:
                config = json.load(f)
        archs = config.get("architectures") or []
        family = None
        for arch in archs:
            family = HF_ARCHITECTURES.get(arch)
            if family:
                break
        if family is None:
            family = HF_MODEL_TYPES.get(config.get("model_type", ""))
        if family is None:
            raise ValueError(
                f"unknown architecture: architectures={archs!r}, "
                f"model_type={config.get('model_type')!r}; supported: "
                f"{sorted(HF_ARCHITECTURES)}"
            )
        num_heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        head_dim = config.get("head_dim") or hidden // num_heads
        rope_scaling = None
        rs = config.get("rope_scaling") or None
        rope_theta = config.get("rope_theta")
        # transformers 5 moved rope settings into `rope_parameters`.
        rp = config.get("rope_parameters") or None
        gemma = _gemma_hf_fields(config, family, rp) if family in GEMMA_FAMILIES else {}
        if family == "gemma3" and rp and "full_attention" in rp:
            rp = rp["full_attention"]  # Gemma 3: per layer type; the local one is read above
        if rp:
            rope_theta = rp.get("rope_theta", rope_theta)
            if rp.get("rope_type", "default") != "default":
                rs = rp
        if rs:
            rope_type = rs.get("rope_type") or rs.get("type")
            if rope_type == "llama3":
                rope_scaling = RopeScaling(
                    rope_type="llama3",
                    factor=float(rs["factor"]),
                    low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(
                        rs.get("original_max_position_embeddings", 8192)
                    ),
                )
            elif rope_type == "linear":
                rope_scaling = RopeScaling(rope_type="linear", factor=float(rs["factor"]))
            elif rope_type not in (None, "default"):
                raise ValueError(
                    f"rope_scaling type {rope_type!r} is not supported: allowed are "
                    "'llama3', 'linear' and none"
                )
        sliding_window = None
        if family in GEMMA_FAMILIES:
            sliding_window = config.get("sliding_window")
        elif family == "mistral":
            sliding_window = config.get("sliding_window")
        elif family == "qwen2" and config.get("use_sliding_window"):
            sliding_window = config.get("sliding_window")
        # Per-layer kinds where the config lists them (Qwen2 windows only the layers from
        # max_window_layers on); without a window every layer is full attention.
        layer_types = config.get("layer_types") if sliding_window is not None else None
        if family in GEMMA_FAMILIES and sliding_window is not None and not layer_types:
            # Configs from before `layer_types`: a sliding layer, then a global one every
            # `sliding_window_pattern` layers (Gemma 2: every 2nd, Gemma 3: every 6th).
            pattern = config.get("sliding_window_pattern") or (2 if family == "gemma2" else 6)
            layer_types = [
                "sliding_attention" if (i + 1) % pattern else "full_attention"
                for i in range(config["num_hidden_layers"])
            ]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(
                rope_theta if rope_theta is not None else DEFAULT_ROPE_THETA.get(family, 10000.0)
            ),
            rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", family == "qwen2")),
            sliding_window=sliding_window,
            layer_types=tuple(layer_types) if layer_types else None,
            family=family,
            **gemma,
        )

    @classmethod
    def from_gguf(cls, metadata: dict, tensor_names: set[str] | None = None) -> ModelConfig:
        """From GGUF key/value metadata (as returned by `weights.gguf.read_metadata`)."""
        arch = metadata.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(
                f"unknown GGUF architecture general.architecture={arch!r}; "
                f"supported: {list(GGUF_ARCHITECTURES)}"
            )

        def get(key, default=None):
            value = metadata.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"GGUF metadata lacks required key {arch}.{key!r}")
            return value

        hidden = int(get("embedding_length"))
        num_heads = int(get("attention.head_count"))
        head_dim = int(metadata.get(f"{arch}.attention.key_length") or hidden // num_heads)
        vocab = metadata.get(f"{arch}.vocab_size")
        if vocab is None:
            vocab = len(metadata["tokenizer.ggml.tokens"])
        rope_scaling = None
        scaling_type = metadata.get(f"{arch}.rope.scaling.type")
        if scaling_type == "linear":
            rope_scaling = RopeScaling(rope_type="linear", factor=float(get("rope.scaling.factor")))
        elif scaling_type not in (None, "none"):
            raise ValueError(
                f"GGUF {arch}.rope.scaling.type={scaling_type!r} is not supported: "
                "allowed are 'linear' and 'none'"
            )
        tie = tensor_names is not None and "output.weight" not in tensor_names
        bias = tensor_names is not None and "blk.0.attn_q.bias" in tensor_names
        context = int(metadata.get(f"{arch}.context_length", 2048))
        gemma: dict[str, Any] = {}
        sliding_window = None
        layer_types = None
        if arch in GEMMA_FAMILIES:
            gemma = _gemma_gguf_fields(metadata, arch, hidden, int(get("block_count")))
            sliding_window = gemma.pop("sliding_window")
            layer_types = gemma.pop("layer_types")
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(metadata.get(f"{arch}.attention.head_count_kv") or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=context,
            tie_word_embeddings=tie,
            attention_bias=bias,
            sliding_window=sliding_window,
            layer_types=layer_types,
            family=arch,
            **gemma,
        )


# transformers' defaults where a config omits rope_theta (Gemma 3: 1e6 global, 1e4 local).
DEFAULT_ROPE_THETA = {"gemma3": 1_000_000.0}
GEMMA3_LOCAL_ROPE_THETA = 10_000.0


def _gemma_hf_fields(config: dict, family: str, rope_parameters: dict | None) -> dict:
    """The ModelConfig fields a Gemma 2/3 HF config sets beyond the Llama ones."""
    act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in HF_ACTIVATIONS:
        raise ValueError(
            f"hidden_activation={act!r} is not supported: allowed are {sorted(HF_ACTIVATIONS)}"
        )
    fields = dict(
        hidden_act=HF_ACTIVATIONS[act],
        norm_offset=1.0,
        post_norms=True,
        qk_norm=family == "gemma3",
        embed_scale=float(config["hidden_size"]) ** 0.5,
        query_pre_attn_scalar=float(config.get("query_pre_attn_scalar", 256)),
        attn_logit_softcapping=config.get("attn_logit_softcapping"),
        final_logit_softcapping=config.get("final_logit_softcapping"),
    )
    if family == "gemma3":
        local = config.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_THETA)
        sliding = (rope_parameters or {}).get("sliding_attention")
        if sliding:
            if sliding.get("rope_type", "default") != "default":
                raise ValueError(
                    "rope_parameters.sliding_attention.rope_type="
                    f"{sliding.get('rope_type')!r} is not supported: allowed is 'default'"
                )
            local = sliding.get("rope_theta", local)
        fields["rope_local_theta"] = float(local)
    return fields


def _gemma_gguf_fields(metadata: dict, arch: str, hidden: int, num_layers: int) -> dict:
    """Gemma 2/3 fields from GGUF metadata. llama.cpp's converter writes the window but not
    the layer pattern, the query scale or Gemma 3's local RoPE base: those take transformers'
    defaults, as its GGUF loader does (a sliding layer, then a global one every 2nd / 6th;
    query_pre_attn_scalar 256; local base 10,000)."""
    window = metadata.get(f"{arch}.attention.sliding_window")
    pattern = 2 if arch == "gemma2" else 6
    fields = dict(
        hidden_act="gelu_tanh",
        norm_offset=1.0,
        post_norms=True,
        qk_norm=arch == "gemma3",
        embed_scale=float(hidden) ** 0.5,
        query_pre_attn_scalar=float(metadata.get(f"{arch}.attention.query_pre_attn_scalar", 256)),
        sliding_window=int(window) if window is not None else None,
        layer_types=None,
    )
    if window is not None:
        fields["layer_types"] = tuple(
            "sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(num_layers)
        )
    if arch == "gemma2":
        fields["attn_logit_softcapping"] = float(
            metadata.get("gemma2.attn_logit_softcapping", 50.0)
        )
        fields["final_logit_softcapping"] = float(
            metadata.get("gemma2.final_logit_softcapping", 30.0)
        )
    else:
        cap = metadata.get("gemma3.final_logit_softcapping")
        fields["final_logit_softcapping"] = float(cap) if cap is not None else None
        fields["rope_local_theta"] = GEMMA3_LOCAL_ROPE_THETA
    return fields


def rope_frequencies(config: ModelConfig, local: bool = False) -> Any:
    """Inverse frequencies f32[H/2] with the configured scaling applied (numpy, computed once);
    local: those of the sliding layers when `rope_local_theta` is set (Gemma 3)."""
    import numpy as np

    h = config.head_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    if local:
        return inv_freq.astype(np.float32)  # the local RoPE is never scaled
    rs = config.rope_scaling
    if rs is not None and rs.rope_type == "linear":
        inv_freq = inv_freq / rs.factor
    elif rs is not None and rs.rope_type == "llama3":
        # Long wavelengths are slowed down by `factor`, short ones kept, the band between
        # interpolated smoothly (Llama 3.1 reference implementation).
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = np.where(mid, (1 - smooth) * inv_freq / rs.factor + smooth * inv_freq, scaled)
    return inv_freq.astype(np.float32)


# -- presets ------------------------------------------------------------------------------

SMOLLM2_135M = ModelConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    family="llama",
)

TINY_LLAMA_TEST = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    max_position_embeddings=256,
)

# Llama 3.1 architectures (the numbers of Meta's config.json files), for plans and dry runs
# of real sizes without their weights (`jax_infer.plan`); serving them loads an HF directory.
_LLAMA31_ROPE = RopeScaling(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)

LLAMA31_8B = ModelConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=_LLAMA31_ROPE,
    max_position_embeddings=131072,
)

LLAMA31_70B = LLAMA31_8B.replace(
    hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64
)

# Gemma 3 270M (the named model "gemma3-270m"): 18 layers, five of every six a 512-token window.
GEMMA3_270M = ModelConfig(
    vocab_size=262144,
    hidden_size=640,
    intermediate_size=2048,
    num_layers=18,
    num_heads=4,
    num_kv_heads=1,
    head_dim=256,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    sliding_window=512,
    layer_types=tuple("sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(18)),
    family="gemma3",
    hidden_act="gelu_tanh",
    norm_offset=1.0,
    post_norms=True,
    qk_norm=True,
    embed_scale=640**0.5,
    query_pre_attn_scalar=256.0,
    rope_local_theta=10_000.0,
)

PRESETS = {
    "smollm2-135m": SMOLLM2_135M,
    "tiny-llama-test": TINY_LLAMA_TEST,
    "llama-3.1-8b": LLAMA31_8B,
    "llama-3.1-70b": LLAMA31_70B,
    "gemma3-270m": GEMMA3_270M,
}
