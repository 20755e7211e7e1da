"""`quantize(params, scheme)`: the pure params -> params transform, and scheme names.

Scheme names: `int8` (symmetric, per output channel), `int8-g<N>` (per group of N input
rows), `int4` (= `int4-g32`), `int4-g<N>`; a `+embed` suffix also quantizes the embedding and
the LM head (`int8+embed`, `int4+embed`, `int4+embed-g8`). Those are ~20% of SmolLM2's f32
bytes and read once per decoded token by the tied head, so the suffix matters for both memory
and speed; it is a separate switch because the embedding is the most quality-sensitive
matrix of small models. Its group defaults to the scheme's for int8 and to 16 for int4:
SmolLM2's embedding (Q8_0 in the GGUF) lost 7.3% perplexity at int4-g32 and 4.8% at g16 on a
4k-token slice of GPL-3 (the linears, already Q4_1, lose 0.4% at g32), and g16 still keeps
the whole int4 model under 0.15x of its f32 bytes.

What gets quantized: every 2-D float leaf (the projection kernels [in, out]); with `+embed`
also `embed` (stored transposed, as the LM head [D, V], see quant/arrays.py) and `lm_head`.
Norm scales and biases stay as they are.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp

from jax_infer.cpu.layout import TiledF32Array, untile
from jax_infer.quant.arrays import (
    QuantizedArray,
    as_quantized,
    describe,
    quantize_matrix,
    rebuild,
)

EMBEDDING_NAMES = ("embed", "lm_head")
DEFAULT_INT4_GROUP = 32
DEFAULT_INT4_EMBED_GROUP = 16
_SCHEME = re.compile(
    r"^int(?P<bits>8|4)(?:-g(?P<group>[1-9][0-9]*))?"
    r"(?P<embed>\+embed(?:-g(?P<embed_group>[1-9][0-9]*))?)?$"
)


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    bits: int  # 8 or 4
    group: int | None  # rows of K per scale; None = per output channel (int8 only)
    embedding: bool  # also quantize embed / lm_head
    embed_group: int | None = None  # their group, when embedding

    @property
    def name(self) -> str:
        group = "" if self.group is None else f"-g{self.group}"
        embed = ""
        if self.embedding:
            embed = "+embed" + ("" if self.embed_group is None else f"-g{self.embed_group}")
        return f"int{self.bits}{group}{embed}"


def parse_scheme(scheme: str | QuantScheme) -> QuantScheme:
    if isinstance(scheme, QuantScheme):
        return scheme
    match = _SCHEME.match(scheme) if isinstance(scheme, str) else None
    if match is None:
        raise ValueError(
            f"quantization={scheme!r} is not a scheme: allowed are int8, int8-g<N>, int4, "
            "int4-g<N> (N a multiple of 8 for int4), each optionally with +embed or "
            "+embed-g<M>"
        )
    bits = int(match["bits"])
    group = int(match["group"]) if match["group"] else None
    embed_group = int(match["embed_group"]) if match["embed_group"] else None
    if bits == 4:
        group = DEFAULT_INT4_GROUP if group is None else group
        if match["embed"] and embed_group is None:
            embed_group = DEFAULT_INT4_EMBED_GROUP
        for g in (group, embed_group):
            if g is not None and g % 8:
                raise ValueError(
                    f"quantization={scheme!r}: int4 groups must be a multiple of 8, got {g}"
                )
    elif match["embed"] and embed_group is None:
        embed_group = group
    return QuantScheme(bits, group, bool(match["embed"]), embed_group if match["embed"] else None)


def _leaf_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def quantize(params, scheme: str | QuantScheme):
    """A copy of params with the selected matrices replaced by QuantizedArrays."""
    s = parse_scheme(scheme)

    def convert(path, leaf):
        name = _leaf_name(path)
        last = name.rsplit("/", 1)[-1]
        if isinstance(leaf, TiledF32Array):  # an f32 matrix in another layout
            leaf = untile(leaf)
        if as_quantized(leaf) is not None:
            raise ValueError(f"{name} is already quantized; quantize float params only")
        if leaf.ndim != 2 or not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        if last in EMBEDDING_NAMES:
            if not s.embedding:
                return leaf
            return quantize_matrix(
                leaf, s.bits, s.embed_group, transposed=last == "embed", name=name
            )
        return quantize_matrix(leaf, s.bits, s.group, name=name)

    return jax.tree_util.tree_map_with_path(
        convert, params, is_leaf=lambda x: isinstance(x, (QuantizedArray, TiledF32Array))
    )


def is_quantized(params) -> bool:
    """Whether any matrix is quantized (f32 matrices in column tiles are not)."""
    return any(
        isinstance(x, QuantizedArray)
        for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedArray))
    )


def weight_bytes(params) -> int:
    """Bytes the params occupy: packed int4 counts half a byte per weight, as stored."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))


# -- checkpoints ------------------------------------------------------------------------
# Orbax restores a custom pytree node as the dict of its children unless it is given a
# target, and a loader has no target before it has read the checkpoint. So a checkpoint
# stores quantized matrices as plain dicts of arrays, plus a JSON description (format and
# static fields, keyed by the leaf's path) from which `join_quantized` rebuilds them.


def split_quantized(params) -> tuple[Any, dict[str, dict]]:
    """(params with each QuantizedArray replaced by the dict of its arrays, description)."""
    description: dict[str, dict] = {}

    def plain(path, leaf):
        if isinstance(leaf, QuantizedArray):
            description[_leaf_name(path)] = describe(leaf)
            return {f.name: getattr(leaf, f.name) for f in _data_fields(leaf)}
        return leaf

    tree = jax.tree_util.tree_map_with_path(
        plain, params, is_leaf=lambda x: isinstance(x, QuantizedArray)
    )
    return tree, description


def join_quantized(tree, description: dict[str, dict]):
    """Inverse of `split_quantized`: rebuild the QuantizedArrays named in description."""
    if not description:
        return tree
    tree = dict(tree)
    for name, desc in description.items():
        *parents, last = name.split("/")
        node = tree
        for key in parents:
            if key not in node:
                raise ValueError(f"checkpoint describes quantized leaf {name!r} but has no {key!r}")
            node[key] = dict(node[key])
            node = node[key]
        if last not in node or not isinstance(node[last], dict):
            raise ValueError(f"checkpoint describes quantized leaf {name!r} but holds no arrays")
        node[last] = rebuild(node[last], desc)
    return tree


def _data_fields(q: QuantizedArray):
    return [f for f in dataclasses.fields(q) if f.name not in ("shape", "transposed")]
