"""What every loader shares: transforms, shape checks, dtype casts and a progress bar.

Loaders stream tensors one at a time into a `ParamsBuilder`, which converts each and keeps
only the result, so at most the source (often a memory map) and one converted copy exist.
"""

from __future__ import annotations

import sys
import time

import jax.numpy as jnp
import numpy as np

from jax_infer.config import ModelConfig
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


class ParamsBuilder:
    """Collects converted tensors under their params paths, checking shapes as they come."""

    def __init__(self, config: ModelConfig, dtype, source: str, progress: bool = True):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.source = source
        self.expected = expected_shapes(config)
        self.flat: dict[str, jnp.ndarray] = {}
        self.progress = Progress(len(self.expected), f"loading {source}", progress)

    def put(self, path: str, array: np.ndarray, tag: str, src_name: str):
        if path not in self.expected:
            raise WeightsError(
                f"{self.source}: tensor {src_name!r} maps to {path!r}, which this config does "
                "not have (wrong architecture or config?)"
            )
        array = transform(np.asarray(array), tag, self.config)
        want = self.expected[path]
        if tuple(array.shape) != want:
            raise WeightsError(
                f"{self.source}: tensor {src_name!r} has shape {tuple(array.shape)} after "
                f"conversion, but the config expects {want} for {path!r}"
            )
        self.flat[path] = jnp.asarray(array, dtype=self.dtype)
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
