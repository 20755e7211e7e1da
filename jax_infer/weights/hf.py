"""Load an HF model directory: config.json plus one or many (indexed) safetensors files.

With a mesh, tensors are not read whole: each one is handed to the builder as a lazy
safetensors slice over the file's memory map, and each device's block is read from it.
"""

from __future__ import annotations

import json
import os

from safetensors import SafetensorError, safe_open

from jax_infer.config import ModelConfig
from jax_infer.weights.common import ParamsBuilder, WeightsError
from jax_infer.weights.names import IGNORED_SUFFIXES, name_map


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise WeightsError(f"no *.safetensors files in HF model directory {path!r}")
    paths = [os.path.join(path, n) for n in files]
    for p in paths:
        if not os.path.isfile(p):
            raise WeightsError(f"safetensors shard {p!r} named by the index is missing")
    return paths


def load_hf(
    path: str, dtype="float32", progress: bool = True, *, mesh=None, rules=None
) -> tuple[ModelConfig, dict]:
    """(config, params). mesh (a `jax_infer.sharding.make_mesh` Mesh) creates every parameter
    directly in its sharding under `rules` (default `sharding.DEFAULT_RULES`); without one,
    params are whole arrays on the default device."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"HF model directory not found: {path!r}")
    config = ModelConfig.from_hf_config(path)
    names = name_map("hf", config)
    builder = ParamsBuilder(
        config,
        dtype,
        os.path.basename(os.path.normpath(path)),
        progress,
        mesh=mesh,
        rules=rules,
    )
    for file in safetensors_files(path):
        try:
            handle = safe_open(file, framework="numpy")
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"cannot read safetensors file {file!r}: {e}") from e
        with handle as f:
            for name in f.keys():
                if name.endswith(IGNORED_SUFFIXES):
                    continue
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                if name not in names:
                    raise WeightsError(f"{file}: unexpected tensor {name!r} for {config.family}")
                dst, tag = names[name]
                try:
                    # A slice reads nothing yet; the builder reads each device's block.
                    tensor = f.get_tensor(name) if mesh is None else f.get_slice(name)
                except (SafetensorError, OSError) as e:
                    raise WeightsError(f"{file}: tensor {name!r} is unreadable: {e}") from e
                builder.put(dst, tensor, tag, name)
    return config, builder.finish()
