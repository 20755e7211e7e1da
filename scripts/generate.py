"""Generate a completion from the command line.

python scripts/generate.py --prompt "The capital of France is" --max_tokens 32
python scripts/generate.py --chat --prompt "Write a haiku about the sea."
python scripts/generate.py --mesh_model=4        # tensor parallel over 4 devices
python scripts/generate.py --quantization int8 --kv_cache_dtype int8 --max_num_seqs 4
python scripts/generate.py --config=configs/cpu_smollm2_int8_speculative.py --max_tokens 32
python scripts/generate.py --config=configs/tpu_v5e8_llama31_8b_bf16.py --dry_run

Model, engine and mesh flags are the shared groups of scripts/shared_flags.py. With --config,
the config's sampling section also sets --max_tokens, --temperature, --top_p, --top_k and
--seed (a flag given explicitly wins), and its speculative section turns on speculative
decoding.
"""

from __future__ import annotations

import sys

import jax
import shared_flags
from absl import app, flags

from jax_infer import LLM, SamplingParams

FLAGS = flags.FLAGS
shared_flags.define_model_flags()
shared_flags.define_engine_flags()
shared_flags.define_mesh_flags()
shared_flags.define_config_flags()
flags.adopt_module_key_flags(shared_flags)  # --help lists the shared flags too
flags.DEFINE_string(
    "prompt", "The capital of France is", "Prompt text (the user turn with --chat)."
)
flags.DEFINE_bool("chat", False, "Wrap the prompt in the model's chat template.")
flags.DEFINE_integer("max_tokens", 64, "Tokens to generate at most.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
flags.DEFINE_integer("seed", None, "Sampling seed (same seed, same output).")
flags.DEFINE_bool("stream", True, "Print tokens as they are generated.")
SAMPLING_FLAGS = {name: ("sampling", name) for name in ("max_tokens", "temperature", "top_p")}
SAMPLING_FLAGS |= {"top_k": ("sampling", "top_k"), "seed": ("sampling", "seed")}


def main(argv):
    del argv
    cfg = shared_flags.apply_config(extra=SAMPLING_FLAGS)
    if FLAGS.dry_run:
        return shared_flags.dry_run(cfg)
    # Starts jax.distributed first when the flags (or a launcher) ask for several processes.
    llm = LLM(**shared_flags.llm_kwargs(config=cfg))
    # The sampling section (flags folded in): stop strings, penalties, ... come from a config.
    params = SamplingParams(**cfg["sampling"])
    # Every process of a multi-process job runs the same steps; only process 0 prints.
    quiet = jax.process_index() != 0
    if FLAGS.chat:
        chunks = llm.chat_stream([{"role": "user", "content": FLAGS.prompt}], params)
    else:
        chunks = llm.stream(FLAGS.prompt, params)
        if not quiet:
            print(FLAGS.prompt, end="")
    last = None
    for chunk in chunks:
        if FLAGS.stream and not quiet:
            print(chunk.delta_text, end="", flush=True)
        last = chunk
    if quiet:
        return
    if not FLAGS.stream:
        print(last.text, end="")
    print()
    print(f"[{len(last.token_ids)} tokens, finish_reason={last.finish_reason}]", file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=shared_flags.parse_flags)
