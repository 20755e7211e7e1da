"""scripts/model_report_lib.py: bits per byte (comparable across tokenizers), the bytes a
tokenization scores, the smallest-good-enough pick, and the table and chart of two models."""

from __future__ import annotations

import math

import model_report_lib as lib
import pytest


class CharTokenizer:
    """One token per character; id 1 is BOS when `bos` is set."""

    def __init__(self, bos: bool):
        self.bos_token_id = 1 if bos else None

    def encode(self, text, add_special_tokens=True):
        ids = [ord(c) + 2 for c in text]
        return ([1] if add_special_tokens and self.bos_token_id else []) + ids

    def decode(self, ids):
        return "".join(chr(i - 2) for i in ids if i > 1)


def test_eval_ids_count_the_scored_bytes():
    text = "héllo"  # 6 UTF-8 bytes
    ids, scored = lib.eval_ids(CharTokenizer(bos=True), text)
    assert ids[0] == 1 and len(ids) == 6 and scored == 6  # BOS: every character is scored
    ids, scored = lib.eval_ids(CharTokenizer(bos=False), text)
    assert len(ids) == 5 and scored == 5  # no BOS: the first character has no context
    with pytest.raises(ValueError, match="gives 1 token"):
        lib.eval_ids(CharTokenizer(bos=False), "h")


def test_bits_per_byte():
    # A uniform guess over 256 byte values costs 8 bits per byte.
    assert lib.bits_per_byte(100 * math.log(256), 100) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="scored_bytes=0"):
        lib.bits_per_byte(1.0, 0)


def row(model, variant, bpb, nbytes, speed, ppl=10.0):
    return {
        "model": model,
        "variant": variant,
        "bits_per_byte": bpb,
        "perplexity": ppl,
        "decode_weight_bytes": nbytes,
        "stored_weight_bytes": nbytes,
        "decode_tokens_per_s": speed,
        "prefill_tokens_per_s": 10 * speed,
        "num_layers": 30,
        "intermediate_size": 1536,
        "num_heads": 9,
        "num_kv_heads": 3,
        "load_average": (1.0, 1.0, 1.0),
    }


ROWS = [
    row("small", "f32", 1.00, 500e6, 20.0),
    row("small", "int4", 1.04, 150e6, 60.0),
    row("small", "layers50", 1.60, 250e6, 40.0),
    row("big", "f32", 0.90, 1100e6, 8.0),
    row("big", "int8", 0.91, 400e6, 15.0),
]


def test_smallest_good_enough_crosses_models():
    assert lib.smallest_good_enough(ROWS, 0.0)["variant"] == "f32"  # big/f32: the best
    pick = lib.smallest_good_enough(ROWS, 0.02)  # bar 0.918: big/int8 reads less than f32
    assert (pick["model"], pick["variant"]) == ("big", "int8")
    pick = lib.smallest_good_enough(ROWS, 0.2)  # bar 1.08: small/int4 is the smallest
    assert (pick["model"], pick["variant"]) == ("small", "int4")
    with pytest.raises(ValueError, match="tolerance=-0.1"):
        lib.smallest_good_enough(ROWS, -0.1)
    with pytest.raises(ValueError, match="rows is empty"):
        lib.smallest_good_enough([], 0.1)


def test_table_and_chart(tmp_path, capsys):
    interleaved = {"small/int4": {"decode_tokens_per_s": 55.0}}
    assert lib.speed_of(ROWS[1], interleaved) == (55.0, True)
    assert lib.speed_of(ROWS[0], interleaved) == (20.0, False)
    lib.print_table(ROWS)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["model", "variant", "layers", "F", "N/K", "bits/B"]
    assert "3.00" in lines[3]  # small/int4 decodes 3x small/f32
    pytest.importorskip("matplotlib")
    path = tmp_path / "chart" / "report.png"
    lib.draw(ROWS, str(path), interleaved, "Apache-2.0")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
