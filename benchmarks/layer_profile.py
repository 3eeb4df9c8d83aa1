"""Where the milliseconds of a DiT layer go: one Wan2.1 forward under jax.profiler, every GPU
kernel attributed to the model op that launched it.

    python benchmarks/layer_profile.py --case 14b-720p --batch 2 --num_layers 2 \
        --attention wan-720p:2 --linear_quant fp8 [--calls 3] [--top 30] [--trace_dir DIR]
    python benchmarks/layer_profile.py --case tiny-cpu        # smoke test anywhere (CPU ops)

The forward is `dit_forward.build_case` (random weights, latents, timesteps, text). After one
warm-up call, --calls synchronised calls run under `jax.profiler.trace`; the trace's device
events (the kernels; on the CPU, the XLA ops of the host plane) are summed per HLO instruction
and divided by --calls. Each instruction is named by the `op_name` metadata of the compiled HLO
(the Flax module path and the JAX primitive), so the table says which part of the block a kernel
belongs to. XLA's command buffers are turned off for the run (with them a whole layer is one
CUDA-graph launch that no op names), so launch gaps differ slightly from a normal run; the table
sums kernel time only. Ops under the scanned blocks are divided by the layer count (ms per
layer); the rest (patch and time embeddings, text projection, head) is reported per forward.

Categories: "self-attention operator" (the FPSA or cuDNN kernels and the operator's own
pre-pass and reorders, i.e. everything inside `fpsa_attention`), "GEMM" (cuBLAS / cuBLASLt /
Triton matmul kernels), "cross-attention core" (its scores, softmax, weighted sum), and
"elementwise / reduction" for the rest (norms, modulation, RoPE, gating, residual adds, the FP8
quantize passes, layout copies).
"""

from __future__ import annotations

import os

# XLA's command buffers (CUDA graphs) would show a layer as one graph launch with no HLO op per
# kernel; the profile launches each kernel on its own. Set before JAX starts its backend.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="

import argparse  # noqa: E402
import collections
import dataclasses
import glob
import re
import tempfile
from pathlib import Path

import jax
from dit_forward import CASES, build_case, parse_attention

from fpsa_jax.attention import IMPLS
from fpsa_jax.config import LINEAR_QUANTS
from fpsa_jax.model.fp8_linear import FP8_LINEAR_IMPLS, check_backend

GEMM_KERNEL = re.compile(r"gemm|nvjet|xmma|cutlass|cublas|matmul|triton_gemm", re.I)
WRAPPER = re.compile(r"^(jit|pjit|jvp|transpose|remat|checkpoint|while|body|cond|branch)\b")
OP_NAME = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?op_name="([^"]*)"', re.M)


@dataclasses.dataclass
class OpTime:
    """Device time of one HLO instruction, summed over the profiled calls."""

    hlo_op: str
    kernel: str
    op_name: str
    ns: float = 0.0
    launches: int = 0


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its `op_name` metadata, from a compiled module's text."""
    return {m.group(1): m.group(2) for m in OP_NAME.finditer(hlo_text)}


def category(op: OpTime) -> str:
    name = op.op_name
    if "fpsa_attention" in name:  # the operator's named scope (fpsa_jax.attention.api)
        return "self-attention operator"
    if "cross_attention_core" in name:  # fpsa_jax.model.wan.text_attention
        return "cross-attention core"
    if GEMM_KERNEL.search(op.kernel) or "dot_general" in name:
        return "GEMM"
    return "elementwise / reduction"


LINEAR = re.compile(r"(self_attn|cross_attn|ffn)/(?:\w+\.qkv/)?(q|k|v|o|fc1|fc2)/")


def part(op: OpTime) -> str:
    """The finer bucket of a block op for the accounting table: which linear a GEMM is, and which
    step of the block an elementwise pass belongs to (by its module path)."""
    cat, name = category(op), op.op_name
    linear = LINEAR.search(name)
    if cat != "GEMM" and cat != "elementwise / reduction":
        return cat
    if cat == "GEMM":
        return f"GEMM {linear.group(1)}.{linear.group(2)}" if linear else "GEMM (other)"
    if "fp8_row_quant" in name:  # fpsa_jax.model.fp8_linear's Triton writer
        return "FP8 row quantize (one pass with its LayerNorm / GELU)"
    if "rms_norm_rope" in name:  # fpsa_jax.model.norms.rms_norm's Triton writer
        return "q/k RMSNorm (+ RoPE) in one pass"
    if "norm_q" in name or "norm_k" in name:
        return "q/k RMSNorm"
    if re.search(r"\.qkv/(stack|mul|add|sub|concatenate)$", name):
        return "RoPE (q, k)"
    if linear:
        return "linear inputs/outputs (casts, FP8 absmax + quantize, scales, bias)"
    if "cross_attn_norm" in name:
        return "cross-attention LayerNorm"
    if "ffn/" in name:
        return "GELU"
    if re.search(r"blocks/(add|mul|sub)$", name):
        return "residual adds (gates, modulation, LayerNorm fused in)"
    return "other elementwise"


def where(op_name: str) -> str:
    """The module path and primitive of an op_name, without the jit/transform wrappers."""
    parts = [p for p in op_name.split("/") if p and not WRAPPER.match(p)]
    return "/".join(parts[-5:])


def _stats(event) -> dict:
    try:
        return {k: v for k, v in event.stats}
    except (TypeError, ValueError):
        return {}


def device_op_times(trace_dir: str, names: dict[str, str]) -> list[OpTime]:
    """Kernel time per HLO instruction from the trace's device planes (GPU), or the host's XLA
    op events where there is no device plane (CPU)."""
    from jax.profiler import ProfileData

    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    if not files:
        raise RuntimeError(f"no .xplane.pb written under {trace_dir}")
    data = ProfileData.from_file(max(files, key=lambda f: Path(f).stat().st_mtime))
    planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
    ops: dict[str, OpTime] = {}

    def add(key, kernel, ns):
        op = ops.get(key)
        if op is None:
            op = ops[key] = OpTime(key, kernel, names.get(key, ""))
        op.ns += ns
        op.launches += 1

    if planes:
        for plane in planes:
            for line in plane.lines:
                if line.name.startswith("XLA") or "Stream" not in line.name:
                    continue  # derived lines (XLA Ops / Modules) would count kernels twice
                for event in line.events:
                    stats = _stats(event)
                    add(str(stats.get("hlo_op", event.name)), event.name, event.duration_ns)
    else:  # CPU: the thunks of the host plane carry the HLO instruction as their name
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    if event.name in names:
                        add(event.name, event.name, event.duration_ns)
    return list(ops.values())


def profile(args) -> None:
    case = build_case(
        args.case,
        args.impl,
        args.linear_quant,
        args.linear_impl,
        args.batch,
        args.num_layers,
        args.attention,
    )
    compiled = case.forward.lower(*case.args).compile()
    names = hlo_op_names(compiled.as_text())
    jax.block_until_ready(compiled(*case.args))  # warm-up
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="layer_profile-")
    with jax.profiler.trace(trace_dir):
        for _ in range(args.calls):
            jax.block_until_ready(compiled(*case.args))
    ops = device_op_times(str(trace_dir), names)
    layers = case.config.num_layers

    def per_call_ms(op):
        scale = layers if "blocks" in op.op_name else 1
        return op.ns / 1e6 / args.calls / scale

    print(
        f"# {args.case} B={args.batch} layers={layers} attention={args.attention} "
        f"linear_quant={args.linear_quant} ({jax.devices()[0].device_kind}, jax {jax.__version__})"
    )
    totals = collections.defaultdict(float)
    outside = unnamed = 0.0
    for op in ops:
        if "blocks" in op.op_name:
            totals[category(op)] += per_call_ms(op)
        elif op.op_name:
            outside += per_call_ms(op)
        else:  # a kernel the HLO text does not name (e.g. a library's own helper kernel)
            unnamed += per_call_ms(op)
    layer_ms = sum(totals.values())
    print("| per layer | ms | share |\n|---|---|---|")
    for cat, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {cat} | {ms:.2f} | {ms / layer_ms:.1%} |")
    print(f"| **layer (kernel time)** | **{layer_ms:.2f}** | |")
    print(f"| outside the blocks, per forward | {outside:.2f} | |")
    print(f"| kernels with no HLO op name, per forward | {unnamed:.2f} | |")
    parts = collections.defaultdict(float)
    for op in ops:
        if "blocks" in op.op_name:
            parts[part(op)] += per_call_ms(op)
    print("\n| per layer, by part | ms | share |\n|---|---|---|")
    for name, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {ms:.2f} | {ms / layer_ms:.1%} |")
    print("\n| top ops | ms / layer | launches / call | category | op | kernel |")
    print("|---|---|---|---|---|---|")
    block_ops = sorted((op for op in ops if "blocks" in op.op_name), key=lambda o: -o.ns)
    for op in block_ops[: args.top]:
        print(
            f"| {op.hlo_op} | {per_call_ms(op):.2f} | {op.launches / args.calls / layers:g} | "
            f"{category(op)} | {where(op.op_name)} | {op.kernel[:60]} |"
        )
    unnamed_ops = sorted((op for op in ops if not op.op_name), key=lambda o: -o.ns)[:5]
    for op in unnamed_ops:
        print(f"no HLO op name: {op.hlo_op} ({op.kernel[:60]}) {per_call_ms(op):.2f} ms / call")
    print(f"\ntrace: {trace_dir}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--case", default="14b-720p", choices=sorted(CASES))
    p.add_argument("--batch", type=int, default=2, help="B (2 = the CFG pair)")
    p.add_argument("--num_layers", type=int, default=2, help="blocks (ms per layer comparable)")
    p.add_argument("--attention", default="dense", help="dense or PRESET:PHASE, e.g. wan-720p:2")
    p.add_argument("--impl", default="auto", choices=IMPLS, help="self-attention impl")
    p.add_argument("--linear_quant", default="none", choices=LINEAR_QUANTS)
    p.add_argument("--linear_impl", default="cublaslt", choices=FP8_LINEAR_IMPLS)
    p.add_argument("--calls", type=int, default=3, help="profiled forwards (after one warm-up)")
    p.add_argument("--top", type=int, default=30, help="ops listed")
    p.add_argument("--trace_dir", help="keep the trace here (default: a temporary folder)")
    args = p.parse_args(argv)
    try:
        parse_attention(args.attention)
    except ValueError as e:
        p.error(str(e))
    for flag in ("batch", "num_layers", "calls", "top"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.trace_dir and Path(args.trace_dir).exists() and not Path(args.trace_dir).is_dir():
        p.error(f"--trace_dir {args.trace_dir} exists and is not a folder")
    if args.linear_quant == "fp8":
        try:
            check_backend(args.linear_impl)
        except ValueError as e:
            p.error(f"--linear_quant fp8: {e}")
    profile(args)


if __name__ == "__main__":
    main()
