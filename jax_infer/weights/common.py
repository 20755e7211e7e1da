"""What every loader shares: transforms, shape checks, dtype casts and a progress bar.

Loaders stream tensors one at a time into a `ParamsBuilder`, which converts each and keeps
only the result, so at most the source (often a memory map) and one converted copy exist.

Given a mesh, the builder creates each parameter directly in its sharding
(`jax_infer.sharding`): every device receives only its own slice, read from the source by
index, so no device holds a whole split tensor, and from a lazy source (a safetensors slice)
the host reads only the slices its devices hold.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_infer.config import ModelConfig
from jax_infer.sharding import param_sharding
from jax_infer.weights.names import expected_shapes


class WeightsError(ValueError):
    """A weights file that is missing, truncated, or does not fit the model."""


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's rotate-half halves).

    llama.cpp's converter reshapes the output rows as [heads, 2, H/2] and swaps the last two
    axes; the inverse reshapes as [heads, H/2, 2] and swaps back. Works for a bias vector too.
    """
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def transform(w: np.ndarray, tag: str, config: ModelConfig) -> np.ndarray:
    if tag == "copy":
        return w
    if tag == "T":
        return w.T
    if tag == "minus_one":
        return w - 1
    if tag in ("T_q", "unperm_q"):
        w = unpermute_rows(w, config.num_heads)
    elif tag in ("T_k", "unperm_k"):
        w = unpermute_rows(w, config.num_kv_heads)
    else:
        raise ValueError(f"unknown transform tag {tag!r}")
    return w.T if tag.startswith("T") else w


class Progress:
    """A one-line progress bar on stderr, quiet when disabled."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.count, self.start = 0, time.perf_counter()

    def step(self, n: int = 1):
        self.count += n
        if self.enabled and (self.count == self.total or self.count % 8 == 0):
            width = 30
            done = int(width * self.count / max(self.total, 1))
            sys.stderr.write(
                f"\r{self.label} [{'#' * done}{'.' * (width - done)}] {self.count}/{self.total}"
                f" {time.perf_counter() - self.start:.1f}s"
            )
            if self.count == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def transformed_shape(shape: tuple[int, ...], tag: str) -> tuple[int, ...]:
    """Shape of `transform(w, tag)` for a source of this shape, without reading it."""
    return shape[::-1] if tag.startswith("T") else shape


def source_shape(source) -> tuple[int, ...]:
    """Shape of a numpy array or of a lazy safetensors slice (`get_shape()`)."""
    if hasattr(source, "shape"):
        return tuple(int(n) for n in source.shape)
    return tuple(int(n) for n in source.get_shape())


def block_reader(source, tag: str, config: ModelConfig, dtype):
    """index (a tuple of slices into the converted tensor) -> that block, converted.

    "copy" and "T" blocks are read from the matching source block, so a lazy source reads
    only that block; the q/k row permutations (GGUF, already in memory) convert the whole
    tensor once. Blocks are memoized: replicas of a block are read once.
    """
    whole = None
    blocks: dict[tuple, np.ndarray] = {}

    def read(index: tuple) -> np.ndarray:
        nonlocal whole
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in blocks:
            if tag == "copy":
                block = source[index]
            elif tag == "T":
                block = source[index[::-1]].T
            else:
                if whole is None:
                    everything = tuple(slice(None) for _ in index)
                    whole = transform(np.asarray(source[everything]), tag, config)
                block = whole[index]
            blocks[key] = np.ascontiguousarray(block, dtype=dtype)
        return blocks[key]

    return read


class ParamsBuilder:
    """Collects converted tensors under their params paths, checking shapes as they come.

    `put` takes a numpy array, or with a mesh also a lazy source (a safetensors slice); with
    `mesh` set every parameter is created in its `jax_infer.sharding` sharding under `rules`.
    """

    def __init__(
        self,
        config: ModelConfig,
        dtype,
        source: str,
        progress: bool = True,
        *,
        mesh=None,
        rules=None,
    ):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.source = source
        self.expected = expected_shapes(config)
        self.flat: dict[str, jnp.ndarray] = {}
        self.progress = Progress(len(self.expected), f"loading {source}", progress)
        self.mesh = mesh
        self.rules = rules

    def _check_path(self, path: str, src_name: str):
        if path not in self.expected:
            raise WeightsError(
                f"{self.source}: tensor {src_name!r} maps to {path!r}, which this config does "
                "not have (wrong architecture or config?)"
            )

    def _check_shape(self, path: str, shape: tuple[int, ...], src_name: str):
        want = self.expected[path]
        if shape != want:
            raise WeightsError(
                f"{self.source}: tensor {src_name!r} has shape {shape} after "
                f"conversion, but the config expects {want} for {path!r}"
            )

    def put(self, path: str, array, tag: str, src_name: str):
        if self.mesh is not None:
            self._put_sharded(path, array, tag, src_name)
            return
        self._check_path(path, src_name)
        array = transform(np.asarray(array), tag, self.config)
        self._check_shape(path, tuple(array.shape), src_name)
        self.flat[path] = jnp.asarray(array, dtype=self.dtype)
        self.progress.step()

    def _put_sharded(self, path: str, source, tag: str, src_name: str):
        self._check_path(path, src_name)
        shape = transformed_shape(source_shape(source), tag)
        self._check_shape(path, shape, src_name)
        sharding = param_sharding(path, shape, self.config, self.mesh, self.rules)
        read = block_reader(source, tag, self.config, self.dtype)
        self.flat[path] = jax.make_array_from_callback(shape, sharding, read, dtype=self.dtype)
        self.progress.step()

    def finish(self) -> dict:
        missing = sorted(set(self.expected) - set(self.flat))
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise WeightsError(
                f"{self.source}: {len(missing)} parameters missing from the file: {shown}"
            )
        return unflatten(self.flat)


def unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat
