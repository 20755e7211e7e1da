"""Quantize a model once and save it as an orbax checkpoint that loads without the float weights.

    python scripts/quantize.py --model smollm2-135m --scheme int8+embed --out /tmp/smollm2-int8
    python scripts/generate.py --model /tmp/smollm2-int8 --prompt "The capital of France is"

Schemes are those of `jax_infer.quant` (int8, int8-g64, int4, int4-g64, ..., +embed to also
quantize the embedding and LM head). The checkpoint records the scheme in jax_infer.json's
"extra"; `LLM(model=out)` restores the quantized arrays as they were saved.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import shared_flags
from absl import app, flags

from jax_infer import weights
from jax_infer.llm import load_tokenizer, resolve_dtype
from jax_infer.quant import parse_scheme, quantize, weight_bytes

FLAGS = flags.FLAGS
shared_flags.define_model_flags(quantization=False, dtype_help="Dtype of the unquantized leaves.")
flags.adopt_module_key_flags(shared_flags)  # --help lists the shared flags too
flags.DEFINE_string("scheme", "int8+embed", "Quantization scheme (see jax_infer.quant).")
flags.DEFINE_string("out", None, "Directory of the new orbax checkpoint (must not exist).")
flags.mark_flag_as_required("out")


def main(argv):
    del argv
    scheme = parse_scheme(FLAGS.scheme)
    dtype = resolve_dtype(FLAGS.dtype)
    config, params, fmt, path, reader = weights.load(FLAGS.model, dtype, progress=True)

    def cast(leaf):
        # The same cast LLM applies on load, so quantize-on-load and this checkpoint agree.
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != dtype:
            return leaf.astype(dtype)
        return leaf

    params = jax.tree.map(cast, params)
    t0 = time.perf_counter()
    qparams = jax.block_until_ready(quantize(params, scheme))
    seconds = time.perf_counter() - t0
    before, after = weight_bytes(params), weight_bytes(qparams)
    weights.save_orbax(
        FLAGS.out,
        qparams,
        config,
        tokenizer=load_tokenizer(fmt, path, reader),
        extra={"quantization": scheme.name, "source": FLAGS.model, "dtype": FLAGS.dtype},
    )
    print(
        f"{scheme.name}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB "
        f"({after / before:.3f}x) in {seconds:.1f} s; saved to {FLAGS.out}"
    )


if __name__ == "__main__":
    app.run(main)
