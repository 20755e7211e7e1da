"""Load a GGUF file (llama.cpp's format): metadata, and tensors dequantized to float on load.

Dequantization of every GGML type (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K, and the rest) is
the `gguf` package's, maintained with llama.cpp's formats; we only map names and undo the
q/k row permutation that llama.cpp's converter applies for its interleaved RoPE.
"""

from __future__ import annotations

import os

import numpy as np

from jax_infer.config import ModelConfig
from jax_infer.weights.common import ParamsBuilder, WeightsError
from jax_infer.weights.names import IGNORED_SUFFIXES, name_map

# Architectures whose GGUF q/k rows were permuted by the converter (NEOX-style ones were not).
PERMUTED_QK = ("llama", "mistral")


def _reader_class():
    import gguf

    class Reader(gguf.GGUFReader):
        """gguf's reader over a plain ndarray view of its memmap: the reader slices the file
        once per metadata value (a 49k-token vocabulary is ~250k slices), and a memmap slice
        costs a Python-level __array_finalize__ each; an ndarray view of the same mapping
        (no copy) parses SmolLM2's metadata 3-4x faster, a cold-start cost of every start."""

        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return Reader


def open_gguf(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path!r}")
    try:
        return _reader_class()(path, "r")
    except (ValueError, IndexError, OSError, AssertionError) as e:
        raise WeightsError(f"cannot read GGUF file {path!r} (truncated or corrupt?): {e}") from e


def read_metadata(reader) -> dict:
    """GGUF key/values as plain Python values (strings, numbers, lists)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError) as e:
            raise WeightsError(f"GGUF metadata field {key!r} is unreadable: {e}") from e
    return meta


def load_gguf(path: str, dtype="float32", progress: bool = True, *, mesh=None, rules=None):
    """Returns (config, params, reader); the reader also builds the tokenizer. With a mesh,
    each dequantized tensor is placed as its `jax_infer.sharding` slices (never whole on one
    device)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    reader = open_gguf(path)
    meta = read_metadata(reader)
    tensor_names = {t.name for t in reader.tensors}
    config = ModelConfig.from_gguf(meta, tensor_names)
    names = name_map("gguf", config)
    builder = ParamsBuilder(config, dtype, os.path.basename(path), progress, mesh=mesh, rules=rules)
    permuted = meta.get("general.architecture") in PERMUTED_QK
    file_size = os.path.getsize(path)
    for t in reader.tensors:
        if t.name.endswith(IGNORED_SUFFIXES):
            continue
        if t.name not in names:
            raise WeightsError(f"{path}: unexpected tensor {t.name!r} for {config.family}")
        if int(t.data_offset) + int(t.n_bytes) > file_size:
            raise WeightsError(f"{path}: tensor {t.name!r} runs past the end of the file")
        dst, tag = names[t.name]
        if not permuted:
            tag = {"T_q": "T", "T_k": "T", "unperm_q": "copy", "unperm_k": "copy"}.get(tag, tag)
        try:
            qtype = GGMLQuantizationType(t.tensor_type)
            data = t.data
            if qtype == GGMLQuantizationType.BF16 and data.dtype != np.uint8:
                # The reader hands BF16 out as 16-bit words; the dequantizer expects bytes.
                data = data.view(np.uint8)
            array = dequantize(data, qtype)
        except (ValueError, NotImplementedError) as e:
            raise WeightsError(f"{path}: cannot dequantize {t.name!r}: {e}") from e
        # GGUF lists dims fastest-first; numpy data is [out, in] already. 1-D stays 1-D.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        array = np.asarray(array, dtype=np.float32).reshape(shape)
        builder.put(dst, array, tag, t.name)
    return config, builder.finish(), reader
