"""Save params once with orbax and restore them fast, with the config and tokenizer beside.

Layout of a checkpoint directory:
    jax_infer.json    {"format": 1, "config": ModelConfig as dict, "dtype": ...,
                       "extra": {...}, "quantized": {leaf path: format} (quantized params only)}
    params/           the orbax PyTree checkpoint
    tokenizer.json, tokenizer_config.json   (when a tokenizer was given)

Quantized params (`jax_infer.quant`) are saved as plain dicts of their arrays and described
in "quantized" (format and shapes per leaf path); `load_orbax` rebuilds them, so a model
quantized once restores without its float weights. Float params are saved and restored
exactly as before: the description is then empty and never written.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.sharding import NamedSharding

from jax_infer.config import ModelConfig
from jax_infer.quant.arrays import FORMATS
from jax_infer.quant.transform import join_quantized, split_quantized
from jax_infer.sharding import head_units, param_sharding, path_str, quantized_specs
from jax_infer.weights.common import WeightsError

META_FILE = "jax_infer.json"
FORMAT_VERSION = 1


def is_orbax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def save_orbax(path: str, params: dict, config: ModelConfig, tokenizer=None, extra=None):
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    target = os.path.join(path, "params")
    if os.path.exists(target):
        raise FileExistsError(f"checkpoint already exists at {target!r}; choose a new directory")
    params, quantized = split_quantized(params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, params)
        ckptr.wait_until_finished()
    # The compute dtype is that of the float leaves (a quantized model also has int8 ones).
    floats = [x for x in jax.tree.leaves(params) if jax.numpy.issubdtype(x.dtype, np.floating)]
    meta = {
        "format": FORMAT_VERSION,
        "config": config.to_dict(),
        "dtype": str(np.dtype(floats[0].dtype)) if floats else "float32",
        "extra": extra or {},
    }
    if quantized:
        meta["quantized"] = quantized
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(path)


def read_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"orbax checkpoint {path!r}: unreadable {META_FILE}: {e}") from e
    if meta.get("format") != FORMAT_VERSION:
        raise WeightsError(
            f"orbax checkpoint {path!r}: format={meta.get('format')!r}, "
            f"this version reads format {FORMAT_VERSION}"
        )
    return meta


def restore_target(ckptr, target: str, config: ModelConfig, meta: dict, mesh, rules=None):
    """Abstract params (shape, dtype, sharding per leaf) that make orbax restore each leaf
    straight into its `jax_infer.sharding` sharding, so every process reads only the slices
    its own devices hold: float leaves by `param_sharding`, the stored arrays of a quantized
    matrix (a dict of them in the checkpoint) by `quantized_specs` of the matrix they
    rebuild, the same placement `shard_params` gives a quantized model in memory."""
    tree = ckptr.metadata(target).item_metadata
    quantized = meta.get("quantized") or {}
    units = head_units(config)

    def abstract(keypath, leaf):
        name = path_str(keypath)
        where = param_sharding(name, leaf.shape, config, mesh, rules)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where)

    def quantized_target(name: str, arrays: dict) -> dict:
        desc = quantized[name]
        cls = FORMATS.get(desc.get("bits"))
        if cls is None:
            raise WeightsError(f"orbax checkpoint: quantized leaf {name!r} has bits {desc!r}")
        shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrays.items()}
        try:
            q = cls(**shapes, shape=tuple(desc["shape"]), transposed=bool(desc["transposed"]))
        except TypeError as e:
            raise WeightsError(f"orbax checkpoint: quantized leaf {name!r}: {e}") from e
        specs = quantized_specs(name, q, mesh.shape, rules, units)
        return {
            k: jax.ShapeDtypeStruct(
                v.shape, v.dtype, sharding=NamedSharding(mesh, getattr(specs, k))
            )
            for k, v in shapes.items()
        }

    def is_quantized(name: str) -> bool:
        return any(name.startswith(q + "/") for q in quantized)

    target = jax.tree_util.tree_map_with_path(
        lambda kp, leaf: None if is_quantized(path_str(kp)) else abstract(kp, leaf), dict(tree)
    )
    for name in quantized:
        *parents, last = name.split("/")
        node, stored = target, tree
        for key in parents:
            node, stored = node[key], stored[key]
        node[last] = quantized_target(name, dict(stored[last]))
    return target


def load_orbax(
    path: str, progress: bool = True, *, mesh=None, rules=None
) -> tuple[ModelConfig, dict, dict]:
    """Returns (config, params, meta). mesh (a `sharding.make_mesh` Mesh): float params are
    restored in their shardings under `rules`, each process reading only its devices'
    slices (`restore_target`); without one, params are whole arrays on the default device."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"orbax checkpoint directory not found: {path!r}")
    meta = read_meta(path)
    config = ModelConfig.from_dict(meta["config"])
    target = os.path.join(path, "params")
    if progress:
        print(f"restoring orbax checkpoint {path}", flush=True)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            if mesh is None:
                params = ckptr.restore(target)
            else:
                params = ckptr.restore(
                    target, restore_target(ckptr, target, config, meta, mesh, rules)
                )
    except Exception as e:  # orbax raises many types for a damaged checkpoint
        raise WeightsError(
            f"orbax checkpoint {target!r} is missing or corrupt ({type(e).__name__}: {e})"
        ) from e
    if meta.get("quantized"):
        try:
            params = join_quantized(params, meta["quantized"])
        except ValueError as e:
            raise WeightsError(f"orbax checkpoint {path!r}: {e}") from e
    return config, params, meta
