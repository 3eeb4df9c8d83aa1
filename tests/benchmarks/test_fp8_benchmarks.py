"""The FP8-linear benchmarks run small on CPU and refuse bad input before any work."""

import json

import pytest

from tests.benchmarks.bench import run_benchmark


def test_fp8_gemm_smoke_times_every_form_and_checks_the_model_form(tmp_path):
    result = run_benchmark(
        "fp8_gemm.py", "--smoke", "--iters", "2", "--json", str(tmp_path / "r.json")
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| (b) model, linear |" in result.stdout and "cuBLASLt FP8 call" in result.stdout
    rows = {(r["shape"], r["form"]): r for r in json.loads((tmp_path / "r.json").read_text())}
    for shape in ("smoke-a", "smoke-b"):
        model, base = rows[(shape, "(b) model, linear")], rows[(shape, "bf16")]
        f32_out = rows[(shape, "(b) float32 GEMM output, linear")]
        assert base["ratio"] == 1.0 and model["tflops"] > 0
        assert model["f8_gemm"] is False  # no cuBLASLt on CPU
        # E4M3 products are exact and summed in float32: only rounding of the sums remains,
        # and the model's bf16 GEMM output rounds each sum once more: 2^-9 relative, and up to
        # 2^-8 where the backend also rounds partial sums (the CPU's dot: 0.0021 seen).
        assert f32_out["gemm_err"] < 1e-5 and base["gemm_err"] < 1e-5
        assert 1e-4 < model["gemm_err"] <= 2.0**-8
        assert 1e-2 < model["quant_rel_l2"] < 0.1  # the quantization itself


def test_fp8_linear_error_reports_every_linear_and_the_output(tmp_path):
    result = run_benchmark(
        "fp8_linear_error.py", "--cases", "tiny-cpu", "--linear_impl", "emulated"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "| layer | stream | self.q |" in out and "| mean |" in out
    rel = float(out.split("rel L2 FP8 vs bf16 linears:")[1].split()[0])
    assert 0 < rel < 0.1


def test_dit_forward_times_bf16_and_fp8_linears_dense_and_fpsa_with_the_attention_split():
    result = run_benchmark(
        "dit_forward.py", "--cases", "tiny-cpu", "--linear_quant", "none", "fp8",
        "--attention", "dense", "demo:0", "--linear_impl", "emulated", "--repeats", "1",
        "--batch", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if "| tiny-cpu |" in line]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [
        ("dense", "none"), ("dense", "fp8"), ("demo:0", "none"), ("demo:0", "fp8"),
    ]  # fmt: skip
    for r in rows:
        per_layer, attention, rest = (float(r[i]) for i in (9, 10, 11))
        assert attention > 0 and rest == pytest.approx(per_layer - attention, abs=0.11)


def _share_rows(out: str, header: str) -> dict[str, float]:
    """{name: ms} of the rows "| name | ms | share% |" of the table under `header`."""
    rows = {}
    for line in out.split(header)[1].split("\n\n")[0].splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 3 and cells[2].endswith("%"):
            rows[cells[0]] = float(cells[1])
    return rows


def test_layer_profile_attributes_every_kernel_of_a_block_to_a_category():
    result = run_benchmark(
        "layer_profile.py", "--case", "tiny-cpu", "--attention", "demo:0", "--linear_quant",
        "fp8", "--linear_impl", "emulated", "--calls", "1", "--num_layers", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    shares = _share_rows(out, "| per layer | ms | share |")
    # The operator's and the cross-attention's named scopes are found; GEMMs by their dots.
    assert {"self-attention operator", "GEMM", "cross-attention core"} <= set(shares)
    assert all(ms > 0 for ms in shares.values())
    layer = float(out.split("| **layer (kernel time)** | **")[1].split("**")[0])
    assert layer == pytest.approx(sum(shares.values()), abs=0.02)
    # The finer table splits the same time: each GEMM by its linear, the rest by block step.
    parts = _share_rows(out, "| per layer, by part | ms | share |")
    assert {"GEMM self_attn.q", "GEMM ffn.fc2", "GEMM cross_attn.o"} <= set(parts)
    assert layer == pytest.approx(sum(parts.values()), abs=0.05)
    assert "fpsa_attention_xla" in out  # ops are named by their module path


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("dit_forward.py", ["--linear_quant", "int8"], "invalid choice: 'int8'"),
        ("dit_forward.py", ["--linear_quant", "fp8"], "--linear_quant fp8: FP8 linears"),
        ("dit_forward.py", ["--num_layers", "0"], "--num_layers must be >= 1"),
        ("dit_forward.py", ["--attention", "sparse"], "--attention takes dense or PRESET:PHASE"),
        ("dit_forward.py", ["--attention", "wan-720p:3"], "wan-720p has phases 0..2"),
        ("layer_profile.py", ["--calls", "0"], "--calls must be >= 1"),
        ("layer_profile.py", ["--trace_dir", "README.md"], "exists and is not a folder"),
        ("layer_profile.py", ["--attention", "wan-480p:9"], "wan-480p has phases 0..2"),
        ("layer_profile.py", ["--linear_quant", "fp8"], "--linear_quant fp8: FP8 linears"),
        ("e2e.py", ["--linear_quant", "fp8"], "the backend is cpu"),
        ("e2e.py", ["--linear_quant", "fp16"], "invalid choice: 'fp16'"),
        ("fp8_linear_error.py", ["--cases", "tiny-cpu"], "the backend is cpu"),
        ("fp8_gemm.py", ["--shapes", "14b-huge"], "invalid choice: '14b-huge'"),
        ("row_passes.py", [], "the backend is cpu"),
        ("row_passes.py", ["--presets", "t2v-2b"], "invalid choice: 't2v-2b'"),
        ("quality.py", ["--linear_impl", "cublaslt"], "the backend is cpu"),
        ("quality.py", ["--rows", "FP8 everywhere"], "--rows: unknown ['FP8 everywhere']"),
    ],
)
def test_bad_input_is_refused_in_one_line(script, args, message):
    result = run_benchmark(script, *args, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in result.stderr
