"""Prune a model on calibration text, optionally heal it by distillation, and save it as an
orbax checkpoint that `LLM(model=dir)` loads (config, tokenizer and a prune record beside).

    python scripts/prune.py --method layers --amount 0.25 --output /tmp/smollm2-l25
    python scripts/prune.py --method layers --amount 0.25 --heal_steps 40 --output /tmp/l25h
    python scripts/prune.py --method mlp --amount 0.25 --output /tmp/smollm2-mlp25
    python scripts/prune.py --method heads --amount 0.34 --head_mode kv_groups --output ...
    python scripts/prune.py --method wanda --pattern 2:4 --output /tmp/smollm2-wanda24

Methods: layers (depth; --layer_metric angular|bi, --contiguous), mlp (MLP channels), heads
(attention heads or KV groups), magnitude and wanda (zeroed weights, same shapes: no speed-up
on this CPU). --amount is the fraction removed (for sparse methods with --pattern
unstructured, the sparsity). Calibration and healing read --calibration_text (default GPL-3);
evaluate on other text. With --config, model.name comes from it (pruning runs in float32).
"""

from __future__ import annotations

import json
import os
import time

import shared_flags
from absl import app, flags

from jax_infer import weights
from jax_infer.llm import load_tokenizer
from jax_infer.prune import (
    HealConfig,
    calibration_tokens,
    distillation_loss,
    heal,
    prune_layers,
    prune_sparse,
    prune_width,
)

METHODS = ("layers", "mlp", "heads", "magnitude", "wanda")

FLAGS = flags.FLAGS
shared_flags.define_model_flags(dtype=False, quantization=False)  # pruning runs in float32
shared_flags.define_config_flags()
flags.adopt_module_key_flags(shared_flags)  # --help lists the shared flags too
flags.DEFINE_enum("method", "layers", METHODS, "What to prune.")
flags.DEFINE_float("amount", 0.25, "Fraction removed: of layers, MLP channels, heads, weights.")
flags.DEFINE_string(
    "calibration_text", "/usr/share/common-licenses/GPL-3", "Text to calibrate and heal on."
)
flags.DEFINE_integer("calibration_seqs", 8, "Calibration sequences for the pruning scores.")
flags.DEFINE_integer("calibration_len", 256, "Tokens per calibration sequence.")
flags.DEFINE_enum("layer_metric", "bi", ["angular", "bi"], "Layer score (method=layers).")
flags.DEFINE_bool(
    "contiguous", False, "Remove one contiguous block (Gromov et al.) rather than the n lowest."
)
flags.DEFINE_enum("head_mode", "kv_groups", ["kv_groups", "per_group"], "method=heads.")
flags.DEFINE_string("pattern", "unstructured", "Sparse methods: unstructured or N:M (2:4).")
flags.DEFINE_integer("heal_steps", 0, "Distillation steps after pruning (0: no healing).")
flags.DEFINE_integer("heal_batch", 4, "Sequences per healing step.")
flags.DEFINE_integer("heal_len", 128, "Tokens per healing sequence.")
flags.DEFINE_float("heal_lr", 2e-4, "Peak learning rate (AdamW, warm-up then cosine).")
flags.DEFINE_string("output", None, "Checkpoint directory to create (required).")


def read_calibration(tokenizer, path: str) -> list[int]:
    with open(path, encoding="utf-8") as f:
        return tokenizer.encode(f.read(), add_special_tokens=False)


def prune_model(params, config, tokens, method: str, amount: float):
    """(params, config, info) for one method (see the module docstring)."""
    if method == "layers":
        return prune_layers(
            params,
            config,
            tokens,
            amount,
            metric=FLAGS.layer_metric,
            contiguous=FLAGS.contiguous,
        )
    if method == "mlp":
        return prune_width(params, config, tokens, mlp_fraction=amount)
    if method == "heads":
        return prune_width(params, config, tokens, head_fraction=amount, head_mode=FLAGS.head_mode)
    return prune_sparse(
        params, config, tokens, criterion=method, pattern=FLAGS.pattern, sparsity=amount
    )


def main(argv):
    del argv
    cfg = shared_flags.apply_config()
    if FLAGS.dry_run:
        return shared_flags.dry_run(cfg)
    if FLAGS.output is None:
        raise app.UsageError("--output is required: the checkpoint directory to create")
    if os.path.exists(os.path.join(FLAGS.output, "params")):
        raise app.UsageError(f"--output={FLAGS.output!r} already holds a checkpoint")
    config, params, fmt, path, reader = weights.load(FLAGS.model, "float32", progress=True)
    tokenizer = load_tokenizer(fmt, path, reader)
    ids = read_calibration(tokenizer, FLAGS.calibration_text)
    tokens = calibration_tokens(ids, FLAGS.calibration_len, FLAGS.calibration_seqs)
    t0 = time.perf_counter()
    pruned, new_config, info = prune_model(params, config, tokens, FLAGS.method, FLAGS.amount)
    info["prune_seconds"] = time.perf_counter() - t0
    info["calibration"] = {"text": FLAGS.calibration_text, "shape": list(tokens.shape)}
    info["source_model"] = FLAGS.model
    print(f"pruned ({FLAGS.method}, {FLAGS.amount}) in {info['prune_seconds']:.1f} s")
    print(f"config: {config.num_params():,} -> {new_config.num_params():,} parameters")
    if FLAGS.heal_steps > 0:
        heal_tokens = calibration_tokens(ids, FLAGS.heal_len, len(ids) // FLAGS.heal_len)
        hc = HealConfig(
            steps=FLAGS.heal_steps,
            batch_size=FLAGS.heal_batch,
            learning_rate=FLAGS.heal_lr,
            warmup_steps=max(1, FLAGS.heal_steps // 10),
        )
        probe = heal_tokens[:8]
        before = distillation_loss(pruned, new_config, params, config, probe)
        pruned, history = heal(pruned, new_config, params, config, heal_tokens, hc, progress=True)
        after = distillation_loss(pruned, new_config, params, config, probe)
        print(f"distillation KL on 8 calibration sequences: {before:.4f} -> {after:.4f}")
        info["heal"] = {
            "steps": hc.steps,
            "batch_size": hc.batch_size,
            "seq_len": FLAGS.heal_len,
            "learning_rate": hc.learning_rate,
            "seconds": history["seconds"],
            "kl_before": before,
            "kl_after": after,
            "loss": history["loss"],
        }
    weights.save_orbax(FLAGS.output, pruned, new_config, tokenizer=tokenizer, extra={"prune": info})
    print(f"saved {FLAGS.output}")
    print(
        json.dumps({k: v for k, v in info.items() if k != "single_layer_scores"}, default=str)[
            :2000
        ]
    )


if __name__ == "__main__":
    app.run(main, flags_parser=shared_flags.parse_flags)
