"""Sliding-window perplexity of a model over text files, with tokens/s, as JSON.

    python scripts/perplexity.py --text_file /usr/share/common-licenses/GPL-3 \
        --window 1024 --stride 512 --json results/ppl_f32.json
    python scripts/perplexity.py --quantization int8+embed --text_file a.txt,b.txt ...
    python scripts/perplexity.py --kv_cache_dtype int8 ...   # with the int8 KV cache
    python scripts/perplexity.py --config=configs/cpu_smollm2_f32.py --max_tokens 2048

Several comma-separated --text_file are joined with a blank line between them and tokenized as
one text (no special tokens), so a corpus can be made long enough from short files. See
`jax_infer.eval.perplexity` for how windows are scored.
"""

from __future__ import annotations

import json

import report
import shared_flags
from absl import app, flags

from jax_infer import LLM
from jax_infer.eval import perplexity
from jax_infer.quant import weight_bytes

FLAGS = flags.FLAGS
shared_flags.define_model_flags()
# Scoring uses the static path's int8 rounding (eval.perplexity): auto or int8 only.
shared_flags.define_engine_flags(names=["kv_cache_dtype"])
shared_flags.define_json_flag()
shared_flags.define_config_flags()
flags.adopt_module_key_flags(shared_flags)  # --help lists the shared flags too
flags.DEFINE_list("text_file", ["/usr/share/common-licenses/GPL-3"], "Text file(s), joined.")
flags.DEFINE_integer("window", 1024, "Tokens per forward pass.")
flags.DEFINE_integer("stride", 512, "Tokens between window starts (<= window).")
flags.DEFINE_integer("max_tokens", None, "Evaluate only the first this many tokens.")


def read_text(paths: list[str]) -> str:
    texts = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            texts.append(f.read())
    return "\n\n".join(texts)


def main(argv):
    del argv
    # A config's model section and engine.kv_cache_dtype apply; scoring is the static path, so
    # the rest of the engine section and speculative decoding do not.
    cfg = shared_flags.apply_config()
    if FLAGS.dry_run:
        return shared_flags.dry_run(cfg)
    kwargs = shared_flags.llm_kwargs()
    del kwargs["kv_cache_dtype"]  # the static engine's cache is not used: scoring sets its own
    llm = LLM(
        **kwargs,
        max_num_seqs=1,
        engine="static",
        progress=False,
    )
    ids = llm.tokenizer.encode(read_text(FLAGS.text_file), add_special_tokens=False)
    if FLAGS.max_tokens is not None:
        ids = ids[: FLAGS.max_tokens]
    result = perplexity(
        llm.params,
        llm.config,
        ids,
        window=FLAGS.window,
        stride=FLAGS.stride,
        dtype=llm.dtype,
        progress=True,
        kv_cache_dtype=FLAGS.kv_cache_dtype,
    )
    out = {
        "model": FLAGS.model,
        "quantization": FLAGS.quantization,
        "dtype": FLAGS.dtype,
        "kv_cache_dtype": FLAGS.kv_cache_dtype,
        "text_files": FLAGS.text_file,
        "weight_bytes": weight_bytes(llm.params),
        **result.to_dict(),
    }
    print(json.dumps(out, indent=2))
    report.write_json(FLAGS.json, out)


if __name__ == "__main__":
    app.run(main, flags_parser=shared_flags.parse_flags)
