"""configs/*.py, jax_infer/run_config.py and the scripts' --config / --dry_run.

Defaults come from the library's dataclasses; a wrong key, a wrong type and a config that does
not fit each fail naming the problem; every preset dry-runs (8 simulated CPU devices; the plan
itself needs none); every script runs from each CPU preset (slow: SmolLM2, a few tokens).
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import shared_flags
from absl import flags
from serving_client import stop_server, wait_healthy

from jax_infer import plan, run_config, weights
from jax_infer.engine import EngineConfig
from jax_infer.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.name for p in (ROOT / "configs").glob("*.py"))
CPU_PRESETS = ["cpu_smollm2_f32.py", "cpu_smollm2_int8_speculative.py"]
ENV = dict(
    os.environ,
    PYTHONPATH=str(ROOT),
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
)


def load_preset(name: str):
    path = str(ROOT / "configs" / name)
    loader = importlib.machinery.SourceFileLoader(name[:-3], path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module.get_config()


def run_script(script: str, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- the tree and its defaults -----------------------------------------------------------


def test_defaults_are_the_dataclasses():
    cfg = run_config.resolve({})
    engine = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    assert cfg["engine"] == {k: engine[k] for k in cfg["engine"]}
    assert set(cfg["engine"]) == set(shared_flags.ENGINE_FLAGS)
    sampling = dataclasses.asdict(SamplingParams())
    per_request = set(sampling) - set(cfg["sampling"])  # values a config cannot spell
    assert per_request <= {"logit_bias", "structured_outputs"}, per_request
    assert cfg["sampling"] == {k: sampling[k] for k in cfg["sampling"]}
    assert cfg["device"] == dataclasses.asdict(plan.DeviceSpec())
    assert cfg["model"]["name"] == weights.DEFAULT_MODEL
    assert cfg["speculative"]["method"] is None
    assert run_config.llm_kwargs(cfg)["mesh"] is None
    assert run_config.default_config().to_dict() == cfg


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"engine": {"max_num_seq": 4}}, "config.engine.max_num_seq=4: unknown key; allowed"),
        (
            {"engine": {"max_num_seqs": "64"}},
            "config.engine.max_num_seqs='64' has type str; allowed is int",
        ),
        ({"engine": {"kv_cache_gb": True}}, "config.engine.kv_cache_gb=True has type bool"),
        ({"sampling": {"stop": ("a", 3)}}, "allowed is tuple of str"),
        ({"engin": {}}, "unknown section(s) ['engin']"),
        ({"engine": {"max_num_seqs": 0}}, "EngineConfig.max_num_seqs=0 is invalid"),
        ({"model": {"dtype": "float16"}}, "config.model.dtype='float16' is not supported"),
        ({"model": {"quantization": "int3"}}, "quantization='int3' is not a scheme"),
        ({"speculative": {"num_speculative_tokens": 3}}, "speculative.method is None"),
        ({"speculative": {"method": "medusa"}}, "config.speculative"),
        ({"device": {"kind": "tpu-v9"}}, "config.device.kind='tpu-v9' is not known"),
        ({"mesh": {"model": 0}}, "config.mesh.model=0 is invalid"),
    ],
)
def test_resolve_names_the_problem(tree, message):
    with pytest.raises(ValueError) as e:
        run_config.resolve(tree)
    assert message in str(e.value)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_resolve(name):
    cfg = run_config.resolve(load_preset(name))
    kwargs = run_config.llm_kwargs(cfg)
    assert set(kwargs) <= set(run_config.SCHEMA["engine"]) | {
        "model",
        "dtype",
        "quantization",
        "max_model_len",
        "mesh",
        "speculative_config",
    }
    assert cfg["device"]["kind"] is not None  # each preset says what it is planned for
    if name == "cpu_smollm2_int8_speculative.py":
        assert kwargs["speculative_config"]["quantization"] == "int4+embed"
        assert kwargs["quantization"] == "int8+embed"


# -- flags and config together -----------------------------------------------------------


def script_flags(argv: list[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    shared_flags.define_model_flags(fv)
    shared_flags.define_engine_flags(fv)
    shared_flags.define_mesh_flags(fv)
    shared_flags.define_config_flags(fv, sys_argv=argv)
    flags.DEFINE_integer("max_model_len", 2048, "a script's own default", flag_values=fv)
    flags.DEFINE_integer("max_tokens", 64, "", flag_values=fv)
    return fv


def test_config_then_overrides_then_explicit_flags():
    preset = str(ROOT / "configs" / "cpu_smollm2_f32.py")
    argv = [
        "prog",
        f"--config={preset}",
        "--config.engine.max_num_seqs=3",
        "--config.engine.page_size=32",
        "--page_size=8",  # explicit flag: wins over the config
        "--config.engine.attention_backend=xla",
        "--config.engine.attention_backend=None",  # back to the library's choice
        "--config.sampling.max_tokens=5",
    ]
    fv = script_flags(argv)
    shared_flags.parse_flags(argv, fv)
    cfg = shared_flags.apply_config(fv, extra={"max_tokens": ("sampling", "max_tokens")})
    assert cfg["engine"]["max_num_seqs"] == fv.max_num_seqs == 3
    assert cfg["engine"]["page_size"] == fv.page_size == 8
    assert cfg["engine"]["kv_cache_gb"] == fv.kv_cache_gb == 0.25  # from the file
    assert cfg["engine"]["attention_backend"] is None
    assert cfg["sampling"]["max_tokens"] == fv.max_tokens == 5
    assert cfg["sampling"]["temperature"] == 0.0
    assert cfg["engine"]["max_num_partial_prefills"] == 1 and fv.max_num_partial_prefills == 1
    assert fv.quantization == "none" and cfg["model"]["quantization"] is None
    assert cfg["model"]["max_model_len"] == fv.max_model_len == 2048
    kwargs = shared_flags.llm_kwargs(fv, config=cfg)
    assert kwargs["max_num_seqs"] == 3 and kwargs["page_size"] == 8 and kwargs["mesh"] is None


def test_no_config_keeps_flags_and_a_none_keeps_a_script_default(tmp_path):
    fv = script_flags(["prog", "--max_num_seqs=5"])
    shared_flags.parse_flags(["prog", "--max_num_seqs=5"], fv)
    cfg = shared_flags.apply_config(fv)
    assert cfg["engine"]["max_num_seqs"] == 5 and cfg["model"]["max_model_len"] == 2048
    path = tmp_path / "c.py"
    path.write_text(
        "from jax_infer.run_config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.engine.max_num_partial_prefills = None\n"
        "    c.model.quantization = 'int8'\n"
        "    return c\n"
    )
    fv = script_flags(["prog", f"--config={path}"])
    shared_flags.parse_flags(["prog", f"--config={path}"], fv)
    cfg = shared_flags.apply_config(fv)
    assert fv.max_num_partial_prefills == 0 and cfg["engine"]["max_num_partial_prefills"] is None
    assert fv.quantization == "int8"
    assert fv.max_model_len == 2048 == cfg["model"]["max_model_len"]  # None: the script's


# -- errors from the command line ------------------------------------------------------------


def write_config(tmp_path, body: str) -> str:
    path = tmp_path / f"bad{len(list(tmp_path.iterdir()))}.py"
    path.write_text(
        "from jax_infer.run_config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        + "".join(f"    {line}\n" for line in body.splitlines())
        + "    return c\n"
    )
    return str(path)


def test_command_line_errors_name_the_problem(tmp_path):
    preset = "--config=configs/cpu_smollm2_f32.py"
    cases = [
        (
            [preset, "--config.engine.max_num_seq=4"],
            "config.engine has no key 'max_num_seq': allowed are ['async_scheduling', 'attention_backend'",
        ),
        ([preset, "--config.engin.page_size=4"], "config has no section 'engin'"),
        (
            [preset, "--config.engine.max_num_seqs=many"],
            "max_num_seqs=many: invalid literal for int() with base 10: 'many' "
            "(config.engine.max_num_seqs: allowed is int)",
        ),
        (
            [f"--config={write_config(tmp_path, 'c.engine.max_num_seq = 4')}"],
            "config.engine.max_num_seq=4: unknown key; allowed in config.engine are",
        ),
        (
            [f"--config={write_config(tmp_path, 'c.engine.kv_cache_gb = None')}"],
            "config.engine.kv_cache_gb=None has type NoneType; allowed is float or int",
        ),
    ]
    for args, message in cases:
        proc = run_script("generate.py", *args, "--dry_run", timeout=300)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr[-3000:])
        assert message in proc.stderr, (args, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


# -- dry runs --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_preset_dry_runs_fit(name):
    proc = run_script("serve.py", f"--config=configs/{name}", "--dry_run", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    cfg = run_config.resolve(load_preset(name))
    p = run_config.make_plan(cfg)
    d, m = cfg["mesh"]["data"], cfg["mesh"]["model"]
    assert f"mesh         data={d} x model={m}" in proc.stdout
    assert f"{p.weights.per_device_bytes / 2**30:.2f} GiB per device" in proc.stdout
    assert f"{p.kv.num_pages} pages" in proc.stdout
    assert "verdict      fits" in proc.stdout
    assert "sees 8 cpu device(s)" in proc.stdout  # weights were not needed, nor 32 devices


def test_dry_run_that_does_not_fit_exits_1(tmp_path):
    # Llama-3.1-70B in bf16 over 8 v5e chips: 16.4 GiB of weights a chip, over 16 GiB x 0.9.
    proc = run_script(
        "generate.py",
        "--config=configs/tpu_v5e8_llama31_8b_bf16.py",
        "--config.model.config=llama-3.1-70b",
        "--dry_run",
        timeout=300,
    )
    assert proc.returncode == 1
    assert "DOES NOT FIT" in proc.stdout
    assert "exceeds 14.40 GiB usable of device.memory_gib=16" in proc.stdout
    # An HF config.json as the model config, and the int8 KV cache the Pallas kernel refuses.
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    proc = run_script(
        "serve.py",
        "--config=configs/tpu_v5e8_llama31_8b_bf16.py",
        f"--config.model.config={tmp_path / 'config.json'}",
        "--kv_cache_dtype=int8",
        "--dry_run",
        timeout=300,
    )
    assert proc.returncode == 1
    assert "kv cache     int8, 67584 B/token" in proc.stdout  # 2 x 32 x 8 x (128 + 4)
    assert "kv_cache_dtype='int8' needs attention_backend 'xla'" in proc.stdout


# -- every script from each CPU preset (slow: the real model, a few tokens) -------------------

SCRIPT_ARGS = {
    "generate.py": ["--max_tokens=3", "--prompt=The capital of France is", "--nostream"],
    "benchmark.py": ["--prompt_len=8", "--decode_tokens=2", "--repeats=1"],
    "benchmark_serving.py": ["--scenarios=prefix", "--prefix_len=16", "--max_model_len=64"],
    "perplexity.py": ["--max_tokens=40", "--window=32", "--stride=16"],
    "prune.py": ["--method=magnitude", "--calibration_seqs=1", "--calibration_len=16"],
    "quantize.py": [],
}


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("preset", CPU_PRESETS)
@pytest.mark.parametrize("script", sorted(SCRIPT_ARGS))
def test_script_runs_from_cpu_preset(script, preset, tmp_path):
    args = [f"--config=configs/{preset}", *SCRIPT_ARGS[script]]
    if script in ("benchmark.py", "benchmark_serving.py", "perplexity.py"):
        args.append(f"--json={tmp_path / 'out.json'}")
    if script == "prune.py":
        args.append(f"--output={tmp_path / 'pruned'}")
    if script == "quantize.py":
        args.append(f"--out={tmp_path / 'quantized'}")
    proc = run_script(script, *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    speculative = preset == "cpu_smollm2_int8_speculative.py"
    if script == "generate.py":
        assert "[3 tokens" in proc.stderr
        if speculative:
            # The int4 self-draft (quantized from the float weights) leaves the int8 target's
            # greedy output as it is without speculative decoding.
            off = ["--config.speculative.method=None", "--config.speculative.quantization=None"]
            plain = run_script(
                script, *args, *off, "--config.speculative.num_speculative_tokens=None"
            )
            assert plain.returncode == 0, plain.stderr[-4000:]
            assert plain.stdout == proc.stdout
    elif script == "benchmark.py":
        out = json.loads((tmp_path / "out.json").read_text())
        assert out["quantization"] == ("int8+embed" if speculative else "none")
        assert (out["speculative_config"] is not None) == speculative
    elif script == "perplexity.py":
        out = json.loads((tmp_path / "out.json").read_text())
        assert out["quantization"] == ("int8+embed" if speculative else "none")
    elif script == "quantize.py":
        # The config's scheme (int8+embed), or --scheme's default when the config has none.
        assert proc.stdout.startswith("int8+embed:")
        meta = json.loads((tmp_path / "quantized" / "jax_infer.json").read_text())
        assert meta["extra"]["quantization"] == "int8+embed"
    elif script == "prune.py":
        assert (tmp_path / "pruned" / "jax_infer.json").exists()
    else:
        out = json.loads((tmp_path / "out.json").read_text())
        assert out["flags"]["max_num_seqs"] == 8 and out["flags"]["kv_cache_gb"] == 0.25


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_serve_runs_from_cpu_preset(preset):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "scripts" / "serve.py"), f"--config=configs/{preset}"]
    cmd += [f"--port={port}", "--log_level=warning", "--noprecompile"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 300, lambda: proc.stdout.read().decode()[-3000:])
        r = httpx.post(
            f"{url}/v1/completions",
            json={"prompt": "The capital of France is", "max_tokens": 2, "temperature": 0},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2
        assert r.json()["model"] == "smollm2-135m"
    finally:
        stop_server(proc, grace_s=60)
