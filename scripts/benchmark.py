"""Speed of prefill and decode at batch 1, with the weight-read bandwidth they achieve.

    python scripts/benchmark.py --json results/benchmark.json
    python scripts/benchmark.py --quantization int8+embed --json results/benchmark_int8.json
    python scripts/benchmark.py --speculative ngram --num_prompts 6 --decode_tokens 96 \
        --json results/speculative_ngram.json     # or self-int4, self-int8, draft:<path>
    python scripts/benchmark.py --config=configs/cpu_smollm2_int8_speculative.py

With --config, its model and engine sections set the flags (batch 1 and no prefix caching are
fixed here) and its speculative section is used by the prefill/decode run.

Prefill: tokens/s for one `--prompt_len`-token prompt (time to the first token, sampling
included). Decode: tokens/s over `--decode_tokens` generated tokens through the same loop
`LLM.generate` runs (host round trip and sampling included). Decode at batch 1 reads every
weight once per token, so weight bytes x tokens/s is the bandwidth it achieves. Every run also
measures the machine's ceilings (jax_infer/eval/ceiling.py: read bandwidth, and XLA's best
matmul rate per dtype) and prints each result beside them as a share: decode's weight reads
against the read bandwidth, prefill's FLOPs (jax_infer.eval.ceiling.forward_flops) against the
matmul ceiling of the compute dtype (--dtype).

On a quiet machine, the f32 / bf16 comparison is re-taken with:
    python scripts/benchmark.py --dtype float32 --json results/benchmark_f32.json
    python scripts/benchmark.py --dtype bfloat16 --json results/benchmark_bf16.json
"""

from __future__ import annotations

import os

import numpy as np
import report
import shared_flags
from absl import app, flags

from jax_infer import LLM
from jax_infer.eval.ceiling import forward_flops
from jax_infer.eval.speed import decode_read_bytes, run_once, tree_bytes

FLAGS = flags.FLAGS
shared_flags.define_model_flags()
# Batch 1 without prefix caching is what this benchmark measures: those two are fixed below.
shared_flags.define_engine_flags(names=["attention_backend", "kv_cache_dtype", "page_size"])
shared_flags.define_mesh_flags()
shared_flags.define_json_flag()
shared_flags.define_config_flags()
flags.adopt_module_key_flags(shared_flags)  # --help lists the shared flags too
flags.DEFINE_integer("prompt_len", 512, "Prompt tokens for the prefill measurement.")
flags.DEFINE_integer("decode_tokens", 128, "Generated tokens for the decode measurement.")
flags.DEFINE_integer(
    "repeats",
    3,
    "Timed repetitions (the median is reported; with --speculative, per prompt and engine).",
)
flags.DEFINE_enum(
    "engine", "continuous", ["continuous", "static"], "Paged continuous engine or static batching."
)
flags.DEFINE_string(
    "speculative",
    None,
    "Instead of the prefill/decode numbers: batch-1 decode tokens/s with and without "
    "speculative decoding (scripts/speculative_prompts.py) on input-grounded and open-ended "
    "prompts. One of ngram, self-int4, self-int8, draft:<path>.",
)
flags.DEFINE_integer("num_speculative_tokens", None, "Drafts per step (default: per method).")
flags.DEFINE_integer("num_prompts", 8, "Prompts per workload for --speculative.")

TEXT = (
    "The history of computing is a story of abstractions layered on abstractions. Early "
    "machines were programmed by rewiring; stored programs made software a thing of its own; "
    "compilers let people write for an idea of a machine rather than a machine. "
)


def speculative_main() -> None:
    import speculative_prompts as spec_bench

    from jax_infer.speculative import config as spec_config

    spec = spec_config.normalize(FLAGS.speculative)
    if FLAGS.num_speculative_tokens is not None:
        spec["num_speculative_tokens"] = FLAGS.num_speculative_tokens
    common = dict(
        shared_flags.llm_kwargs(),
        max_num_seqs=1,
        enable_prefix_caching=False,
        max_model_len=2048,
        progress=False,
    )
    base_llm = LLM(**common)
    spec_llm = LLM(**common, speculative_config=spec)
    n = FLAGS.num_prompts
    result = {
        "model": FLAGS.model,
        "dtype": FLAGS.dtype,
        "speculative": FLAGS.speculative,
        "speculative_config": spec,
        "max_tokens": FLAGS.decode_tokens,
        "load_average_before": os.getloadavg(),
    }
    workloads = {
        "input_grounded": spec_bench.grounded_prompts(n),
        "open_ended": list(spec_bench.OPEN_ENDED[:n]),
    }
    rows = []
    for name, prompts in workloads.items():
        r = spec_bench.compare(base_llm, spec_llm, prompts, FLAGS.decode_tokens, FLAGS.repeats)
        result[name] = r
        rows.append(
            [
                name,
                f"{r['baseline_tokens_per_s']:.1f}",
                f"{r['speculative_tokens_per_s']:.1f}",
                f"{r['speedup']:.2f}x",
                f"{r['acceptance_rate']:.2f}",
                f"{r['mean_accepted_tokens_per_verify']:.2f}",
                r["identical_outputs"],
            ]
        )
    headers = ["workload", "base tok/s", "spec tok/s", "speedup", "accept", "tok/verify"]
    report.print_table([*headers, "identical"], rows)
    result["load_average_after"] = os.getloadavg()
    print(
        f"load average before {result['load_average_before']}, after {result['load_average_after']}"
    )
    report.write_json(FLAGS.json, result)


def main(argv):
    del argv
    cfg = shared_flags.apply_config()
    if FLAGS.dry_run:
        return shared_flags.dry_run(cfg)
    if FLAGS.speculative:
        speculative_main()
        return
    # Prefix caching off: the timed runs repeat one prompt, and a cache hit would turn the
    # prefill measurement into a one-token step.
    # The static engine has no speculative decoding: the config's is used by the continuous one.
    kwargs = shared_flags.llm_kwargs(config=cfg if FLAGS.engine == "continuous" else None)
    llm = LLM(
        **kwargs,
        max_num_seqs=1,
        engine=FLAGS.engine,
        enable_prefix_caching=False,
    )
    ids = llm.tokenizer.encode(TEXT * 64)
    while len(ids) < FLAGS.prompt_len:
        ids = ids + ids
    prompt_ids = ids[: FLAGS.prompt_len]
    run_once(llm, prompt_ids, FLAGS.decode_tokens)  # compile every shape used below
    runs = [run_once(llm, prompt_ids, FLAGS.decode_tokens) for _ in range(FLAGS.repeats)]
    ttft = float(np.median([r[0] for r in runs]))
    decode = float(np.median([r[1] for r in runs]))
    wbytes = decode_read_bytes(llm.params)
    ceiling = report.ceiling()
    machine_bw = ceiling.read_gb_per_s
    prefill_gflops = forward_flops(llm.config, FLAGS.prompt_len) / ttft / 1e9
    matmul_ceiling = ceiling.matmul_gflops[FLAGS.dtype]
    result = {
        "model": FLAGS.model,
        "dtype": FLAGS.dtype,
        "quantization": FLAGS.quantization,
        "attention_backend": FLAGS.attention_backend,
        "page_size": FLAGS.page_size,
        "kv_cache_dtype": FLAGS.kv_cache_dtype,
        "engine": FLAGS.engine,
        "speculative_config": kwargs.get("speculative_config"),
        # With a mesh, weight bytes and bandwidth are the whole model's, all devices together.
        "mesh": {"data": FLAGS.mesh_data, "model": FLAGS.mesh_model},
        "prompt_len": FLAGS.prompt_len,
        "decode_tokens": FLAGS.decode_tokens,
        "prefill_tokens_per_s": FLAGS.prompt_len / ttft,
        "ttft_s": ttft,
        "decode_tokens_per_s": decode,
        "weight_bytes": wbytes,
        "stored_weight_bytes": tree_bytes(llm.params),
        "decode_weight_read_gb_per_s": wbytes * decode / 1e9,
        "machine_read_gb_per_s": machine_bw,
        "prefill_gflops": prefill_gflops,
        "machine_matmul_gflops": matmul_ceiling,
        "prefill_share_of_matmul_ceiling": prefill_gflops / matmul_ceiling,
        "decode_share_of_read_ceiling": wbytes * decode / 1e9 / machine_bw,
    }
    read_share = report.share(result["decode_weight_read_gb_per_s"], machine_bw)
    rows = [
        (
            "prefill tokens/s",
            f"{result['prefill_tokens_per_s']:.1f}",
            "",
            f"{FLAGS.prompt_len}-token prompt",
        ),
        (
            "prefill GFLOP/s",
            f"{prefill_gflops:.1f}",
            report.share(prefill_gflops, matmul_ceiling),
            f"of the best {FLAGS.dtype} matmul here, {matmul_ceiling:.0f} GFLOP/s",
        ),
        ("decode tokens/s", f"{decode:.1f}", "", f"{FLAGS.decode_tokens} tokens, batch 1"),
        (
            "weights read per token (MB)",
            f"{wbytes / 1e6:.0f}",
            "",
            f"{FLAGS.dtype}, quantization {FLAGS.quantization}",
        ),
        (
            "decode weight read (GB/s)",
            f"{result['decode_weight_read_gb_per_s']:.1f}",
            read_share,
            f"of the machine's read, {machine_bw:.1f} GB/s (best pass of the read probe)",
        ),
    ]
    report.print_table(["metric", "value", "share of ceiling", "note"], rows)
    if ceiling.read is not None:
        _, mid, _ = ceiling.read.spread
        print(
            f"read probe: {ceiling.read.describe()}; decode's read is "
            f"{read_share} of the best, {report.share(wbytes * decode / 1e9, mid)} of the median"
        )
        result["machine_read_runs_gb_per_s"] = list(ceiling.read.runs_gb_per_s)
    print(f"load average {os.getloadavg()} (shared machine: shares are of ceilings taken now)")
    report.write_json(FLAGS.json, result)


if __name__ == "__main__":
    app.run(main, flags_parser=shared_flags.parse_flags)
