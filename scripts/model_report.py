"""Model selection: quality against speed and memory for precision, quantized and pruned
variants of several models (by default both real families: SmolLM2-135M and Gemma-3-270M), as
one table, JSON and one chart, so the smallest model good enough can be picked.

    python scripts/model_report.py --json results/model_report.json \
        --png results/model_report.png --work_dir /tmp/model_report
    python scripts/model_report.py --models smollm2-135m --variants f32,int8,layers25

For each model and variant: quality on held-out text (--eval_text, default Apache-2.0;
pruning and healing calibrate on --calibration_text, default GPL-3, never on the evaluation
text) as bits per byte, comparable across tokenizers, beside the model's own perplexity
(`model_report_lib`); batch-1 prefill and decode tokens/s (`jax_infer.eval.speed`, as
scripts/benchmark.py measures them) and the weight bytes a decode step reads. The report
names, for a few tolerances, the variant reading the fewest weight bytes whose bits per byte
are within that tolerance of the best. Pruned variants are built with `jax_infer.prune`,
saved as orbax checkpoints under --work_dir/<model> (reused when present) and loaded through
`LLM(model=dir)` like any model.

Variants: f32, bf16, int8, int4 (weights only; embedding and head stay f32), layers25 /
layers50 (25% / 50% of the layers removed), mlp25 (25% of MLP channels removed),
layers25_healed (layers25 distilled toward f32 for --heal_steps), layers25_int8, and the
zero-weight variants wanda24 / magnitude50 (no speed-up on this CPU: dense kernels).

Speeds on a shared machine drift with its load: each variant's own measurement is taken at a
different time, so `--interleaved` variants are also loaded together and measured in
alternation (`--interleaved_rounds`), every model's together; their medians and ratios to the
first (the first model's f32) are the figures to compare speeds by, and the chart places those
variants at that speed.

The chart needs matplotlib (`pip install -e ".[report]"`); it is imported only to draw.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time

import jax.numpy as jnp
import model_report_lib as lib
import numpy as np
import report
import shared_flags
from absl import app, flags

from jax_infer import LLM, weights
from jax_infer.eval import perplexity
from jax_infer.eval.speed import decode_read_bytes, measure_speed, run_once, tree_bytes
from jax_infer.llm import load_tokenizer
from jax_infer.model.cache import init_cache
from jax_infer.model.step import forward
from jax_infer.prune import (
    HealConfig,
    calibration_tokens,
    heal,
    prune_layers,
    prune_sparse,
    prune_width,
)
from jax_infer.weights.orbax_io import read_meta


@dataclasses.dataclass(frozen=True)
class Variant:
    """checkpoint: None for the original model, else the name of a pruned checkpoint."""

    name: str
    checkpoint: str | None = None
    dtype: str = "float32"
    quantization: str | None = None


VARIANTS = {
    v.name: v
    for v in (
        Variant("f32"),
        Variant("bf16", dtype="bfloat16"),
        Variant("int8", quantization="int8"),
        Variant("int4", quantization="int4"),
        Variant("layers25", "layers25"),
        Variant("layers50", "layers50"),
        Variant("mlp25", "mlp25"),
        Variant("layers25_healed", "layers25_healed"),
        Variant("layers25_int8", "layers25", quantization="int8"),
        Variant("wanda24", "wanda24"),
        Variant("magnitude50", "magnitude50"),
    )
}
DEFAULT_VARIANTS = [
    "f32",
    "bf16",
    "int8",
    "int4",
    "layers25",
    "layers50",
    "mlp25",
    "layers25_healed",
    "layers25_int8",
    "wanda24",
]

FLAGS = flags.FLAGS
# Variants choose their own dtype and quantization; --models names the models.
shared_flags.define_json_flag(default="results/model_report.json")
flags.adopt_module_key_flags(shared_flags)  # --help lists the shared flags too
flags.DEFINE_list("models", ["smollm2-135m", "gemma3-270m"], "Models (names or paths).")
flags.DEFINE_list("variants", DEFAULT_VARIANTS, f"Any of {sorted(VARIANTS)}.")
flags.DEFINE_string("work_dir", "/tmp/model_report", "Where pruned checkpoints are kept.")
flags.DEFINE_string("calibration_text", "/usr/share/common-licenses/GPL-3", "Prune/heal text.")
flags.DEFINE_string("eval_text", "/usr/share/common-licenses/Apache-2.0", "Held-out text.")
flags.DEFINE_integer("eval_chars", 0, "Evaluate on the first this many characters (0: all).")
flags.DEFINE_integer("window", 512, "Perplexity window.")
flags.DEFINE_integer("stride", 256, "Perplexity stride (< window: every token is scored).")
flags.DEFINE_enum("layer_metric", "bi", ["angular", "bi"], "Layer score for layersNN.")
flags.DEFINE_bool("contiguous", False, "Remove one contiguous block of layers (Gromov et al.).")
flags.DEFINE_integer("calibration_seqs", 8, "Calibration sequences for pruning scores.")
flags.DEFINE_integer("calibration_len", 256, "Tokens per calibration sequence.")
flags.DEFINE_integer("heal_steps", 40, "Distillation steps for layers25_healed.")
flags.DEFINE_integer("heal_batch", 4, "Sequences per healing step.")
flags.DEFINE_integer("heal_len", 128, "Tokens per healing sequence.")
flags.DEFINE_float("heal_lr", 2e-4, "Peak healing learning rate.")
flags.DEFINE_integer("prompt_len", 256, "Prompt tokens for the prefill measurement.")
flags.DEFINE_integer("decode_tokens", 64, "Generated tokens for the decode measurement.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (median reported).")
flags.DEFINE_list(
    "interleaved",
    ["f32", "int8", "int4", "layers25", "mlp25", "layers25_int8"],
    "Variants whose speed is measured again in alternation, all loaded at once (ratios to the "
    "first are robust to load drifting on a shared machine); empty to skip.",
)
flags.DEFINE_integer("interleaved_rounds", 5, "Alternation rounds for --interleaved.")
flags.DEFINE_list("tolerances", ["0.02", "0.05", "0.1", "0.25"], "Bits-per-byte tolerances.")
flags.DEFINE_string("png", "results/model_report.png", "Draw the chart here ('' to skip).")


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


class Checkpoints:
    """Builds the pruned checkpoints on first use from the float32 original."""

    def __init__(self, model: str, work_dir: str):
        self.model, self.work_dir = model, work_dir
        self._base = None

    def base(self):
        if self._base is None:
            config, params, fmt, path, reader = weights.load(self.model, "float32", False)
            tokenizer = load_tokenizer(fmt, path, reader)
            ids = tokenizer.encode(read_text(FLAGS.calibration_text), add_special_tokens=False)
            tokens = calibration_tokens(ids, FLAGS.calibration_len, FLAGS.calibration_seqs)
            self._base = (config, params, tokenizer, ids, tokens)
        return self._base

    def release(self) -> None:
        """Drop the float32 original kept for building checkpoints (the next model's turn)."""
        self._base = None
        gc.collect()

    def path(self, name: str) -> str:
        path = os.path.join(self.work_dir, name)
        if not os.path.isfile(os.path.join(path, "jax_infer.json")):
            self._build(name, path)
        return path

    def _build(self, name: str, path: str) -> None:
        config, params, tokenizer, ids, tokens = self.base()
        t0 = time.perf_counter()
        layer_kw = dict(metric=FLAGS.layer_metric, contiguous=FLAGS.contiguous)
        if name in ("layers25", "layers50"):
            fraction = 0.25 if name == "layers25" else 0.5
            p, c, info = prune_layers(params, config, tokens, fraction, **layer_kw)
        elif name == "mlp25":
            p, c, info = prune_width(params, config, tokens, mlp_fraction=0.25)
        elif name == "wanda24":
            p, c, info = prune_sparse(params, config, tokens, criterion="wanda", pattern="2:4")
        elif name == "magnitude50":
            p, c, info = prune_sparse(params, config, tokens, criterion="magnitude", sparsity=0.5)
        elif name == "layers25_healed":
            src = self.path("layers25")
            c, p, meta = weights.load_orbax(src, progress=False)
            info = dict(meta["extra"].get("prune", {}))
            heal_tokens = calibration_tokens(ids, FLAGS.heal_len, len(ids) // FLAGS.heal_len)
            hc = HealConfig(
                steps=FLAGS.heal_steps,
                batch_size=FLAGS.heal_batch,
                learning_rate=FLAGS.heal_lr,
                warmup_steps=max(1, FLAGS.heal_steps // 10),
            )
            p, history = heal(p, c, params, config, heal_tokens, hc, progress=True)
            info["heal"] = {
                "steps": hc.steps,
                "batch_size": hc.batch_size,
                "seq_len": FLAGS.heal_len,
                "learning_rate": hc.learning_rate,
                "seconds": history["seconds"],
                "loss_first10": sum(history["loss"][:10]) / min(10, len(history["loss"])),
                "loss_last10": sum(history["loss"][-10:]) / min(10, len(history["loss"])),
            }
        else:
            raise ValueError(f"checkpoint {name!r} is unknown")
        info["build_seconds"] = time.perf_counter() - t0
        print(f"built {name} in {info['build_seconds']:.0f} s", flush=True)
        weights.save_orbax(path, p, c, tokenizer=tokenizer, extra={"prune": info})


def make_llm(variant: Variant, checkpoints: Checkpoints) -> tuple[LLM, str]:
    source = checkpoints.model
    if variant.checkpoint is not None:
        source = checkpoints.path(variant.checkpoint)
    llm = LLM(
        model=source,
        dtype=variant.dtype,
        quantization=variant.quantization,
        max_num_seqs=1,
        max_model_len=max(FLAGS.window, FLAGS.prompt_len + FLAGS.decode_tokens) + 16,
        kv_cache_gb=0.1,
        enable_prefix_caching=False,
        progress=False,
    )
    return llm, source


def speed_prompt(llm: LLM) -> list[int]:
    ids = llm.tokenizer.encode(read_text(FLAGS.calibration_text), add_special_tokens=False)
    return ids[: FLAGS.prompt_len]


class DecodeStep:
    """One jitted batch-1 decode step (`model.step.forward`, T=1, 256 cached positions) of an
    LLM's params, timed without the engine's host work: the weight-reading part of decode."""

    def __init__(self, llm: LLM, attn_len: int = 256):
        self.llm, self.attn_len = llm, attn_len
        self.cache = init_cache(llm.config, 1, attn_len, llm.dtype)
        self.args = (
            jnp.zeros((1, 1), jnp.int32),
            jnp.full((1,), attn_len - 1, jnp.int32),
            jnp.ones((1,), jnp.int32),
        )

    def seconds(self) -> float:
        tokens, start, valid = self.args
        t0 = time.perf_counter()
        logits, self.cache = forward(
            self.llm.params,
            tokens,
            start,
            valid,
            self.cache,
            config=self.llm.config,
            dtype=self.llm.dtype,
            attn_len=self.attn_len,
        )
        logits.block_until_ready()
        return time.perf_counter() - t0


def interleaved_speed(names: list[str], checkpoints: dict[str, Checkpoints], rounds: int) -> dict:
    """Decode and prefill tokens/s of several variants of every model measured in alternation
    (round r runs each once), so that a change in the machine's load hits them all alike; the
    medians and the ratios to the first ("<first model>/<first variant>") are reported, keyed
    "<model>/<variant>"."""
    llms = {
        f"{model}/{name}": make_llm(VARIANTS[name], ckpt)[0]
        for model, ckpt in checkpoints.items()
        for name in names
    }
    names = list(llms)
    for llm in llms.values():
        run_once(llm, speed_prompt(llm), FLAGS.decode_tokens)  # compile
    runs = {name: [] for name in names}
    for _ in range(rounds):
        for name, llm in llms.items():
            runs[name].append(run_once(llm, speed_prompt(llm), FLAGS.decode_tokens))
    # The bare decode step, alternated in bursts of 10; the minimum over all bursts is the
    # step's time when the shared machine let it run undisturbed.
    steps = {name: DecodeStep(llm) for name, llm in llms.items()}
    for step in steps.values():
        step.seconds()  # compile
    step_times = {name: [] for name in names}
    for _ in range(3 * rounds):
        for name, step in steps.items():
            step_times[name].extend(step.seconds() for _ in range(10))
    out = {}
    for name in names:
        decode = float(np.median([r[1] for r in runs[name]]))
        ttft = float(np.median([r[0] for r in runs[name]]))
        out[name] = {
            "decode_tokens_per_s": decode,
            "prefill_tokens_per_s": FLAGS.prompt_len / ttft,
            "decode_runs_tokens_per_s": [r[1] for r in runs[name]],
            "decode_step_min_ms": 1e3 * min(step_times[name]),
            "decode_step_median_ms": 1e3 * float(np.median(step_times[name])),
        }
    # Ratios are paired per round (this variant's run against the first variant's run of the
    # same round), then the median over rounds: the load of a round cancels.
    first = runs[names[0]]
    for name in names:
        out[name]["decode_vs_first"] = float(
            np.median([r[1] / f[1] for r, f in zip(runs[name], first)])
        )
        out[name]["prefill_vs_first"] = float(
            np.median([f[0] / r[0] for r, f in zip(runs[name], first)])
        )
        out[name]["step_speedup_vs_first"] = (
            out[names[0]]["decode_step_min_ms"] / out[name]["decode_step_min_ms"]
        )
    return out


def stored_bytes(llm: LLM) -> int:
    """Weight bytes as a checkpoint stores them: without the [D, V] head copy that LLM adds
    for a tied embedding on CPU (`untie_lm_head`)."""
    params = llm.params
    if llm.config.tie_word_embeddings:
        params = {k: v for k, v in params.items() if k != "lm_head"}
    return tree_bytes(params)


def eval_text() -> str:
    text = read_text(FLAGS.eval_text)
    return text[: FLAGS.eval_chars] if FLAGS.eval_chars > 0 else text


def evaluate(variant: Variant, checkpoints: Checkpoints) -> dict:
    llm, source = make_llm(variant, checkpoints)
    eval_ids, scored_bytes = lib.eval_ids(llm.tokenizer, eval_text())
    ppl = perplexity(
        llm.params,
        llm.config,
        eval_ids,
        window=FLAGS.window,
        stride=FLAGS.stride,
        dtype=llm.dtype,
    )
    speed = measure_speed(llm, speed_prompt(llm), FLAGS.decode_tokens, FLAGS.repeats)
    c = llm.config
    row = {
        "model": checkpoints.model,
        "variant": variant.name,
        "source": source,
        "dtype": variant.dtype,
        "quantization": variant.quantization or "none",
        "num_layers": c.num_layers,
        "intermediate_size": c.intermediate_size,
        "num_heads": c.num_heads,
        "num_kv_heads": c.num_kv_heads,
        "num_params": c.num_params(),
        "bits_per_byte": lib.bits_per_byte(ppl.nll_sum, scored_bytes),
        "perplexity": ppl.perplexity,
        "scored_tokens": ppl.scored_tokens,
        "scored_bytes": scored_bytes,
        "decode_weight_bytes": decode_read_bytes(llm.params),
        "stored_weight_bytes": stored_bytes(llm),
        **speed,
        "load_average": os.getloadavg(),
    }
    if variant.checkpoint is not None:  # what was removed, and the healing record
        row["prune"] = read_meta(source)["extra"].get("prune", {})
    del llm
    gc.collect()
    return row


def model_dir(model: str) -> str:
    """A directory name for a model name or path (pruned checkpoints of it go there)."""
    name = os.path.basename(os.path.normpath(model))
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def picks(rows: list[dict]) -> list[dict]:
    """The smallest good-enough variant for each --tolerances entry."""
    out = []
    for tol in (float(t) for t in FLAGS.tolerances):
        r = lib.smallest_good_enough(rows, tol)
        out.append(
            {
                "tolerance": tol,
                "model": r["model"],
                "variant": r["variant"],
                "bits_per_byte": r["bits_per_byte"],
                "decode_weight_bytes": r["decode_weight_bytes"],
            }
        )
    return out


def write_result(rows: list[dict], chosen: list[dict], interleaved: dict) -> None:
    """The JSON, written after every variant too, so a run cut short keeps what it measured."""
    result = {
        "models": FLAGS.models,
        "eval_text": FLAGS.eval_text,
        "calibration_text": FLAGS.calibration_text,
        "eval_chars": FLAGS.eval_chars,
        "window": FLAGS.window,
        "stride": FLAGS.stride,
        "prompt_len": FLAGS.prompt_len,
        "decode_tokens": FLAGS.decode_tokens,
        "layer_metric": FLAGS.layer_metric,
        "contiguous": FLAGS.contiguous,
        "heal_steps": FLAGS.heal_steps,
        "float_dtype_note": "int8/int4 quantize the layer weights; embedding/head stay f32",
        "quality_note": "bits_per_byte is comparable across tokenizers; perplexity is not",
        "rows": rows,
        "smallest_good_enough": chosen,
        "interleaved": interleaved,
        "interleaved_rounds": FLAGS.interleaved_rounds,
    }
    report.write_json(FLAGS.json, result)


def main(argv):
    del argv
    unknown = [v for v in FLAGS.variants + FLAGS.interleaved if v not in VARIANTS]
    if unknown:
        raise app.UsageError(f"--variants: {unknown} unknown; allowed are {sorted(VARIANTS)}")
    if not FLAGS.models:
        raise app.UsageError("--models is empty: name at least one model")
    if FLAGS.stride >= FLAGS.window:
        raise app.UsageError(
            f"--stride={FLAGS.stride} must be < --window={FLAGS.window}: bits per byte count "
            "every token after the first as scored"
        )
    checkpoints = {}
    for model in FLAGS.models:
        work_dir = os.path.join(FLAGS.work_dir, model_dir(model))
        os.makedirs(work_dir, exist_ok=True)
        checkpoints[model] = Checkpoints(model, work_dir)
    rows = []
    for model, ckpt in checkpoints.items():
        for name in FLAGS.variants:
            t0 = time.perf_counter()
            rows.append(evaluate(VARIANTS[name], ckpt))
            r = rows[-1]
            print(
                f"{model}/{name}: {r['bits_per_byte']:.3f} bits/byte, ppl {r['perplexity']:.2f}, "
                f"decode {r['decode_tokens_per_s']:.1f} t/s ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            write_result(rows, [], {})
        ckpt.release()
    if rows:
        lib.print_table(rows)
    interleaved = {}
    if FLAGS.interleaved:
        interleaved = interleaved_speed(FLAGS.interleaved, checkpoints, FLAGS.interleaved_rounds)
        print(
            f"\ninterleaved speed ({FLAGS.interleaved_rounds} rounds; medians, and the median "
            "of per-round ratios to the first):"
        )
        for name, r in interleaved.items():
            print(
                f"{name:<28} decode {r['decode_tokens_per_s']:6.1f} t/s "
                f"({r['decode_vs_first']:.2f}x)  prefill {r['prefill_tokens_per_s']:6.1f} t/s "
                f"({r['prefill_vs_first']:.2f}x)  bare decode step min "
                f"{r['decode_step_min_ms']:.1f} ms ({r['step_speedup_vs_first']:.2f}x)"
            )
    chosen = picks(rows) if rows else []
    for p in chosen:
        print(
            f"smallest within {100 * p['tolerance']:.0f}% of the best bits/byte: "
            f"{p['model']}/{p['variant']} ({p['bits_per_byte']:.3f} bits/byte, "
            f"{p['decode_weight_bytes'] / 1e6:.0f} MB read per token)"
        )
    write_result(rows, chosen, interleaved)
    if FLAGS.png and rows:
        lib.draw(rows, FLAGS.png, interleaved, os.path.basename(FLAGS.eval_text))
        print(f"wrote {FLAGS.png}")


if __name__ == "__main__":
    app.run(main)
