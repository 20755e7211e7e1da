"""Quantize a model once and save it as an orbax checkpoint that loads without the float weights.

    python scripts/quantize.py --model smollm2-135m --scheme int8+embed --out /tmp/smollm2-int8
    python scripts/generate.py --model /tmp/smollm2-int8 --prompt "The capital of France is"
python scripts/quantize.py --config=configs/cpu_smollm2_int8_speculative.py --out /tmp/q

With --config, model.name and model.dtype come from it, and model.quantization (when set)
is the scheme unless --scheme is given.

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
shared_flags.define_config_flags()
flags.adopt_module_key_flags(shared_flags)  # --help lists the shared flags too
flags.DEFINE_string("scheme", "int8+embed", "Quantization scheme (see jax_infer.quant).")
flags.DEFINE_string("out", None, "Directory of the new orbax checkpoint (must not exist).")


def main(argv):
    del argv
    cfg = shared_flags.apply_config()
    name = cfg["model"]["quantization"]
    if name is None or FLAGS["scheme"].present:
        name = FLAGS.scheme
    scheme = parse_scheme(name)
    cfg["model"]["quantization"] = scheme.name
    if FLAGS.dry_run:
        return shared_flags.dry_run(cfg)
    if FLAGS.out is None:
        raise app.UsageError("--out is required: the directory of the new checkpoint")
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
    app.run(main, flags_parser=shared_flags.parse_flags)
