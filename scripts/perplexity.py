"""Sliding-window perplexity of a model over text files, with tokens/s, as JSON.

    python scripts/perplexity.py --text_file /usr/share/common-licenses/GPL-3 \
        --window 1024 --stride 512 --json results/ppl_f32.json
    python scripts/perplexity.py --quantization int8+embed --text_file a.txt,b.txt ...
    python scripts/perplexity.py --kv_cache_dtype int8 ...   # with the int8 KV cache

Several comma-separated --text_file are joined with a blank line between them and tokenized as
one text (no special tokens), so a corpus can be made long enough from short files. See
`jax_infer.eval.perplexity` for how windows are scored.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from jax_infer import LLM
from jax_infer.eval import perplexity
from jax_infer.quant import weight_bytes

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model name, .gguf file, HF dir or orbax dir.")
flags.DEFINE_string(
    "quantization", "none", "none, or a jax_infer.quant scheme (int8, int4+embed, ...)."
)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute dtype.")
flags.DEFINE_list("text_file", ["/usr/share/common-licenses/GPL-3"], "Text file(s), joined.")
flags.DEFINE_integer("window", 1024, "Tokens per forward pass.")
flags.DEFINE_integer("stride", 512, "Tokens between window starts (<= window).")
flags.DEFINE_enum(
    "kv_cache_dtype", "auto", ["auto", "int8"], "int8: score with the int8 KV cache's rounding."
)
flags.DEFINE_integer("max_tokens", None, "Evaluate only the first this many tokens.")
flags.DEFINE_string("json", None, "Write the result to this JSON file.")


def read_text(paths: list[str]) -> str:
    texts = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            texts.append(f.read())
    return "\n\n".join(texts)


def main(argv):
    del argv
    quantization = None if FLAGS.quantization == "none" else FLAGS.quantization
    llm = LLM(
        model=FLAGS.model,
        dtype=FLAGS.dtype,
        quantization=quantization,
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
    if FLAGS.json:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
        with open(FLAGS.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    app.run(main)
