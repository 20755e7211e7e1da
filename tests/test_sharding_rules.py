"""Sharding rules in-process: logical axes, the head-split rule, fallbacks, errors.

These need no devices (specs are derived from mesh axis sizes alone), so they run in the
pytest process; the multi-device checks are in tests/test_sharding.py.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_infer import sharding
from jax_infer.config import ModelConfig
from jax_infer.weights.names import expected_shapes

SMOLLM2 = ModelConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=1,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
)


def shapes_tree(config: ModelConfig) -> dict:
    tree: dict = {}
    for path, shape in expected_shapes(config).items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return tree


def test_every_param_has_logical_axes_of_its_rank():
    config = SMOLLM2.replace(tie_word_embeddings=False, attention_bias=True)
    for path, shape in expected_shapes(config).items():
        axes = sharding.logical_axes(path, shape)
        assert len(axes) == len(shape), path
        assert all(a is not None for a in axes), f"{path}: {axes}"


@pytest.mark.parametrize(
    "model, attn, kv",
    [
        (2, P(None, None), P(None, None)),  # 9 and 3 heads don't split in 2: replicated
        (3, P(None, "model"), P(None, "model")),
        (4, P(None, None), P(None, None)),
    ],
)
def test_smollm2_head_rule(model, attn, kv):
    """Attention splits at head boundaries only; MLP and vocabulary split regardless."""
    specs = sharding.param_specs(shapes_tree(SMOLLM2), SMOLLM2, {"data": 1, "model": model})
    layer = specs["layers_0"]
    assert layer["wq"] == attn
    assert layer["wk"] == kv and layer["wv"] == kv
    assert layer["wo"] == P(attn[1], None)
    assert layer["w_gate"] == P(None, "model") and layer["w_down"] == P("model", None)
    assert specs["embed"] == P("model", None)
    assert layer["attn_norm"] == P(None)


def test_divisibility_fallback_and_size_one_axes():
    mesh_shape = {"data": 2, "model": 4}
    assert sharding.logical_to_spec(("vocab", "embed"), (97, 64), mesh_shape) == P(None, None)
    assert sharding.logical_to_spec(("vocab", "embed"), (96, 64), mesh_shape) == P("model", None)
    cache = sharding.CACHE_AXES
    assert sharding.logical_to_spec(cache, (3, 8, 4, 16), mesh_shape) == P(
        None, None, "model", None
    )
    assert sharding.logical_to_spec(cache, (2, 8, 4, 16), {"data": 2, "model": 1}) == P(
        "data", None, None, None
    )
    paged = sharding.PAGED_CACHE_AXES
    assert sharding.logical_to_spec(paged, (64, 16, 4, 16), mesh_shape) == P(
        None, None, "model", None
    )
    # Two logical axes on one mesh axis: the first dim wins, the second is replicated.
    assert sharding.logical_to_spec(("mlp", "vocab"), (8, 8), mesh_shape) == P("model", None)


class QTensor(typing.NamedTuple):
    """Stand-in for a quantized leaf of jax_infer.quant: int8 values and per-channel scales."""

    values: object
    scales: object


@pytest.mark.parametrize(
    "path, shape, want",
    [
        ("layers_0/wq/values", (64, 128), ("embed", "q_heads")),
        ("layers_0/wq/scales", (128,), ("q_heads",)),  # per output channel
        ("layers_0/wq/scales", (1, 128), (None, "q_heads")),
        ("layers_0/w_down/scales", (4, 64), ("mlp", "embed")),  # grouped: groups of input rows
        ("embed/scales", (97, 1), ("vocab", None)),  # per row of the table
        ("layers_0/attn_norm", (64,), ("embed",)),
    ],
)
def test_logical_axes_from_path_and_shape(path, shape, want):
    assert sharding.logical_axes(path, shape) == want


def test_quantized_leaves_follow_their_weight():
    config = ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=112,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )
    params = {
        "layers_0": {
            "wq": QTensor(np.zeros((64, 64), np.int8), np.zeros((64,), np.float32)),
            "w_down": QTensor(np.zeros((112, 64), np.int8), np.zeros((1, 64), np.float32)),
        }
    }
    specs = sharding.param_specs(params, config, {"data": 1, "model": 2})
    assert specs["layers_0"]["wq"] == QTensor(P(None, "model"), P("model"))
    assert specs["layers_0"]["w_down"] == QTensor(P("model", None), P(None, None))


def test_rule_errors_name_the_problem():
    with pytest.raises(ValueError, match="layers_0/mystery"):
        sharding.logical_axes("layers_0/mystery", (4,))
    with pytest.raises(ValueError, match="logical axis 'vocab' has no entry"):
        sharding.logical_to_spec(("vocab",), (8,), {"model": 2}, rules={"embed": None})
    with pytest.raises(ValueError, match="mesh axis 'tensor'"):
        sharding.logical_to_spec(("vocab",), (8,), {"model": 2}, rules={"vocab": "tensor"})
    with pytest.raises(ValueError, match="model=0 is invalid"):
        sharding.make_mesh(1, 0)
    with pytest.raises(ValueError, match=r"needs \d+ devices"):
        sharding.make_mesh(1, len(jax.devices()) + 1)
    with pytest.raises(ValueError, match="devices has 1 entries"):
        sharding.make_mesh(1, 2, devices=jax.devices()[:1])


@pytest.mark.parametrize(
    "model, attn, kv, mlp",
    [
        (2, "model", "model", "model"),  # 6 q / 2 kv heads and 1,100 channels all split in 2
        (4, None, None, "model"),  # heads do not divide 4: attention replicated, MLP split
        (8, None, None, None),  # 1,100 % 8 != 0: the MLP falls back to replication too
    ],
)
def test_pruned_config_shards_or_replicates(model, attn, kv, mlp):
    """A pruned model is a smaller config (fewer heads, fewer MLP channels): the same rules,
    each dimension split where the mesh divides it and replicated where it no longer does."""
    pruned = SMOLLM2.replace(num_heads=6, num_kv_heads=2, intermediate_size=1100)
    specs = sharding.param_specs(shapes_tree(pruned), pruned, {"data": 1, "model": model})
    layer = specs["layers_0"]
    assert layer["wq"] == P(None, attn) and layer["wo"] == P(attn, None)
    assert layer["wk"] == P(None, kv) and layer["wv"] == P(None, kv)
    assert layer["w_up"] == P(None, mlp) and layer["w_down"] == P(mlp, None)


def test_pruned_quantized_matrix_keeps_whole_tiles():
    """Quantized, a pruned MLP of 1,100 channels is one 1,100-column tile (64 does not divide
    it), which never splits; 1,152 channels are 18 tiles, which split in 2 but not in 4."""
    from jax_infer.quant import quantize_matrix

    for channels, model, split in ((1100, 2, False), (1152, 2, True), (1152, 4, False)):
        config = SMOLLM2.replace(intermediate_size=channels)
        q = quantize_matrix(jnp.zeros((64, channels)), 8, None)
        spec = sharding.param_specs({"layers_0": {"w_up": q}}, config, {"model": model})
        want = "model" if split else None
        assert spec["layers_0"]["w_up"].values == P(want, None, None), (channels, model)
        assert spec["layers_0"]["w_up"].scales == P(None, want), (channels, model)


def test_quantized_rows_split_only_at_whole_groups():
    """w_down int4-g32 over model=2: K=128 has 4 groups and splits by rows in every array;
    K=96 has 3 groups, which do not split in 2, so no array of the matrix splits its rows."""
    from jax_infer.quant import quantize_matrix

    for k, want in ((128, "model"), (96, None)):
        config = SMOLLM2.replace(intermediate_size=k)
        q = quantize_matrix(jnp.zeros((k, 64)), 4, 32)
        spec = sharding.param_specs({"layers_0": {"w_down": q}}, config, {"model": 2})
        got = spec["layers_0"]["w_down"]
        assert got.packed == P(None, want, None), k
        assert got.block_scale == P(want, None) and got.block_min == P(want, None), k
        assert got.scale_step == P(None) and got.min_step == P(None), k


def test_llm_mesh_argument_is_checked():
    from jax.sharding import Mesh

    from jax_infer.llm import resolve_mesh

    assert resolve_mesh(None) is None
    assert resolve_mesh((1, 1)).shape == {"data": 1, "model": 1}
    with pytest.raises(ValueError, match="mesh='1x2' is invalid"):
        resolve_mesh("1x2")
    with pytest.raises(ValueError, match=r"axes \('x',\)"):
        resolve_mesh(Mesh(np.array(jax.devices()[:1]), ("x",)))
    with pytest.raises(ValueError, match="needs"):
        resolve_mesh((1, len(jax.devices()) + 1))
