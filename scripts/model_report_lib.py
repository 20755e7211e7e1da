"""The model report's quality measure, pick and output (`scripts/model_report.py`), without
flags so tests can import them.

Perplexity per token depends on the tokenizer: SmolLM2's 49k-token and Gemma 3's 262k-token
vocabularies cut the same text into different numbers of tokens, so their perplexities are not
comparable. Bits per byte are: the summed negative log-likelihood of the text (in bits)
divided by the UTF-8 bytes it scored. `eval_ids` tokenizes with the model's own special tokens
(Gemma's BOS, none for SmolLM2), so each model reads the text as it expects; the bytes scored
are then the whole text, less the first token's when there is no BOS (a first token has no
context and is never scored).
"""

from __future__ import annotations

import math
import os

import report


def eval_ids(tokenizer, text: str) -> tuple[list[int], int]:
    """(token ids, UTF-8 bytes of the text the scored tokens cover): every token after the
    first is scored (the report's windows overlap: stride < window)."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    if len(ids) < 2:
        raise ValueError(f"evaluation text gives {len(ids)} token(s): at least 2 are needed")
    total = len(text.encode("utf-8"))
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids[0] == bos:
        return ids, total
    return ids, total - len(tokenizer.decode([ids[0]]).encode("utf-8"))


def bits_per_byte(nll_sum: float, scored_bytes: int) -> float:
    """Natural-log NLL summed over the scored tokens, in bits per scored byte."""
    if scored_bytes < 1:
        raise ValueError(f"scored_bytes={scored_bytes!r} is invalid: must be >= 1")
    return nll_sum / math.log(2.0) / scored_bytes


def smallest_good_enough(rows: list[dict], tolerance: float) -> dict:
    """The row with the fewest weight bytes read per decoded token whose bits per byte are
    within `tolerance` (0.05: 5%) of the best row's, across every model; the faster of equals."""
    if not rows:
        raise ValueError("rows is empty: nothing to pick from")
    if not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r} is invalid: must be >= 0")
    bar = min(r["bits_per_byte"] for r in rows) * (1.0 + tolerance)
    fit = [r for r in rows if r["bits_per_byte"] <= bar]
    return min(fit, key=lambda r: (r["decode_weight_bytes"], -r["decode_tokens_per_s"]))


def speed_of(row: dict, interleaved: dict) -> tuple[float, bool]:
    """(decode tokens/s to plot, whether it is the interleaved measurement)."""
    key = f"{row['model']}/{row['variant']}"
    if key in interleaved:
        return interleaved[key]["decode_tokens_per_s"], True
    return row["decode_tokens_per_s"], False


def print_table(rows: list[dict]) -> None:
    """One line per (model, variant); 'x f32' is decode speed over the same model's f32."""
    base = {r["model"]: r for r in rows if r["variant"] == "f32"}
    headers = ["model", "variant", "layers", "F", "N/K", "bits/B", "ppl", "prefill t/s"]
    headers += ["decode t/s", "x f32", "read MB", "stored MB", "load"]
    table = []
    for r in rows:
        ref = base.get(r["model"])
        ratio = f"{r['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}" if ref else "-"
        table.append(
            [
                r["model"],
                r["variant"],
                r["num_layers"],
                r["intermediate_size"],
                f"{r['num_heads']}/{r['num_kv_heads']}",
                f"{r['bits_per_byte']:.3f}",
                f"{r['perplexity']:.2f}",
                f"{r['prefill_tokens_per_s']:.1f}",
                f"{r['decode_tokens_per_s']:.1f}",
                ratio,
                f"{r['decode_weight_bytes'] / 1e6:.0f}",
                f"{r['stored_weight_bytes'] / 1e6:.0f}",
                f"{r['load_average'][0]:.1f}",
            ]
        )
    report.print_table(headers, table)


MARKERS = "osD^v<>p"


def draw(rows: list[dict], path: str, interleaved: dict, eval_name: str) -> None:
    """Bits per byte (lower is better) against decode tokens/s: one point per (model,
    variant), one color and marker per model, marker area proportional to the weight bytes
    read per token. A point measured in the interleaved pass sits at that (load-robust)
    speed, its label marked '*'."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "drawing the chart needs matplotlib: pip install -e '.[report]' "
            "(or pass --png='' to skip the chart)"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    biggest = max(r["decode_weight_bytes"] for r in rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    for i, model in enumerate(models):
        color = f"C{i}"
        for j, r in enumerate(x for x in rows if x["model"] == model):
            speed, star = speed_of(r, interleaved)
            ax.scatter(
                speed,
                r["bits_per_byte"],
                s=400 * r["decode_weight_bytes"] / biggest,
                alpha=0.6,
                color=color,
                marker=MARKERS[i % len(MARKERS)],
                label=model if j == 0 else None,
            )
            ax.annotate(
                r["variant"] + ("*" if star else ""),
                (speed, r["bits_per_byte"]),
                xytext=(5, 4),
                textcoords="offset points",
                fontsize=8,
                color=color,
            )
    ax.set_xlabel("decode tokens/s (batch 1; * measured interleaved)")
    ax.set_ylabel(f"bits per byte on {eval_name} (lower is better)")
    ax.set_title("quality against speed (marker area: weight bytes read per token)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9, markerscale=0.5)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
