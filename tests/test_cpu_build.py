"""The CPU kernel package's build (jax_infer/cpu/build.py): feature detection from cpuinfo
flags, one availability per kernel family (attention not gated on the matmul kernels), and
`JAX_INFER_CPU_KERNELS=0`, which turns every kernel off while the engine still generates
with the XLA formulations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from jax_infer import SamplingParams
from jax_infer.attention.paged import default_backend
from jax_infer.cpu import attention, build, layout, matmul, parse_cpu_flags

REPO = Path(__file__).resolve().parents[1]

SAPPHIRE_RAPIDS = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\n"
    "flags\t\t: fpu sse2 avx fma avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni "
    "amx_bf16 amx_tile amx_int8\nbugs\t\t: spectre_v1\n"
)


def test_feature_detection_from_cpuinfo_flags():
    cpu = parse_cpu_flags(SAPPHIRE_RAPIDS)
    assert cpu.avx2 and cpu.fma and cpu.avx512f and cpu.avx512bw
    assert cpu.avx512_vnni and cpu.avx512_bf16 and cpu.amx and cpu.can_build
    assert "avx_vnni" in cpu.flags and "spectre_v1" not in cpu.flags  # only the flags line
    assert cpu.names() == [
        "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx"
    ]  # fmt: skip

    # A bare flags line; AVX2 without AVX-512 (the EPYC of ARCHITECTURE.md); partial AMX.
    zen2 = parse_cpu_flags("fpu avx fma avx2 avx_vnni amx_tile")
    assert zen2.avx2 and zen2.fma and zen2.can_build
    assert not (zen2.avx512f or zen2.avx512_vnni or zen2.avx512_bf16 or zen2.amx)
    # "avx512_vnni" is the 512-bit instruction set, not AVX-VNNI (avx_vnni).
    assert not parse_cpu_flags("flags : avx2 fma avx_vnni").avx512_vnni
    # AVX without AVX2, an ARM "Features" line, nothing: no kernel can be built.
    assert parse_cpu_flags("flags : sse2 avx fma").names() == ["fma"]
    for text in ("flags : sse2 avx fma", "Features : fp asimd evtstrm", ""):
        cpu = parse_cpu_flags(text)
        assert not cpu.can_build and not cpu.avx2


def test_kernels_are_built_here():
    """This machine has a compiler and AVX-512 VNNI, so decode uses the kernels; elsewhere
    the XLA formulation takes over (covered by force_xla in test_quant)."""
    if build.features() == 0:
        pytest.skip("no C++ compiler or AVX2 here: the XLA formulation is used")
    assert matmul.available(8)
    assert attention.available()
    cpu = build.cpu_features()
    assert matmul.available(4) == cpu.avx512_vnni
    assert matmul.available(32) == cpu.avx512f


def test_each_family_is_available_on_its_own(monkeypatch):
    """Availability is per family: attention with no matmul kernel built, and the reverse."""
    monkeypatch.setattr(build, "features", lambda: build.PAGED_ATTENTION)
    assert attention.available() and attention.attention_supports(9, 3, 64)
    assert not any(matmul.available(bits) for bits in (8, 4, 32))
    assert default_backend() == "cpu"
    params = {"wq": jnp.zeros((8, 64), jnp.float32)}  # untouched: no f32 kernel built
    assert layout.tile_f32_params(params) is params

    monkeypatch.setattr(build, "features", lambda: build.INT8_MATMUL | build.F32_TILES_MATMUL)
    assert matmul.available(8) and matmul.available(32) and not matmul.available(4)
    assert not attention.available() and not attention.attention_supports(9, 3, 64)
    assert default_backend() == "xla"


# Run in a fresh process: the switch is read once, when the kernels are first asked for.
SWITCHED_OFF = """
import json, sys
from jax_infer import LLM, SamplingParams
from jax_infer.attention.paged import default_backend
from jax_infer.cpu import attention, build, matmul
from jax_infer.cpu.layout import TiledF32Array

llm = LLM(model=sys.argv[1], progress=False)
out = llm.generate(sys.argv[2], SamplingParams(temperature=0.0, max_tokens=12))[0]
print(json.dumps({
    "features": build.features(),
    "matmul": [matmul.available(bits) for bits in (8, 4, 32)],
    "attention": attention.available(),
    "backend": default_backend(),
    "tiled": isinstance(llm.params["layers_0"]["wq"], TiledF32Array),
    "token_ids": list(out.token_ids),
}))
"""


@pytest.mark.real_model
def test_switch_turns_every_kernel_off_and_the_engine_still_generates(smollm2, gguf_path):
    prompt = "The capital of France is"
    env = dict(os.environ, JAX_INFER_CPU_KERNELS="0", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", SWITCHED_OFF, gguf_path, prompt],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["features"] == 0
    assert report["matmul"] == [False, False, False] and not report["attention"]
    assert report["backend"] == "xla" and not report["tiled"]
    assert 1 <= len(report["token_ids"]) <= 12
    # The same greedy tokens as with the kernels (this process, where they are built).
    if build.features():
        want = smollm2.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12))[0]
        assert report["token_ids"] == list(want.token_ids)
