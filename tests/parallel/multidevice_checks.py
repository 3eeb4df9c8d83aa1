"""Multi-device checks, run in a subprocess with 8 forced CPU devices (see test_multidevice.py).

JAX fixes its device count when it is first imported, and tests/conftest.py imports it with one
device, so these checks live in their own process:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.parallel.multidevice_checks

prints one JSON object of measured numbers and facts, and the tests assert on them.
"""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention import FPSAConfig, fpsa_attention
from fpsa_jax.config import WanConfig
from fpsa_jax.model.wan import WanModel, init_params, param_logical_axes
from fpsa_jax.parallel import (
    logical_sharding,
    logical_to_mesh_sharding,
    make_mesh,
    shard_params,
    ulysses_attention,
    use_sharding,
)
from fpsa_jax.parallel import ulysses as ulysses_module
from tests.conftest import TINY_WAN

WINDOWED_FP8 = FPSAConfig(tile=(1, 2, 2), window=(1, 1, 2), quant="fp8", q_group=(1, 1, 2))
WINDOWED = FPSAConfig(tile=(1, 2, 2), window=(1, 1, 1))
CFG = TINY_WAN.replace(dim=48, ffn_dim=64, num_heads=4, text_len=8)


def rel(a, b) -> float:
    """||a - b|| / ||b|| (Frobenius), 0 when both are zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / denom) if denom else float(np.linalg.norm(a))


def record_local_shapes(shapes: list):
    """Wraps the `fpsa_attention` that Ulysses calls so each traced per-device q shape is kept."""
    real = ulysses_module.fpsa_attention

    def recording(q, k, v, **kwargs):
        shapes.append(list(q.shape))
        return real(q, k, v, **kwargs)

    ulysses_module.fpsa_attention = recording


def seq_all_to_all_shapes(hlo: str) -> list[list[int]]:
    """Per-device operand shapes of the compiled all-to-alls over the 'seq' axis."""
    found = []
    for line in hlo.splitlines():
        if "all-to-all(" in line and "{'seq'}" in line:
            found.append(re.findall(r"f32\[([\d,]*)\]", line.split("all-to-all(")[0]))
    return [[int(d) for d in s.split(",")] for shapes in found for s in shapes]


def spec_of(x) -> list:
    return [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec]


def attention_checks(mesh) -> dict:
    rng = np.random.default_rng(0)
    grid = (2, 4, 6)  # L = 48, the tile grid (2, 2, 3)
    q, k, v = (rng.standard_normal((4, 48, 4, 8)).astype(np.float32) for _ in range(3))
    act = logical_sharding(("batch", "length", "heads", "kv"), mesh)
    out = {}
    for name, config in (("dense", None), ("windowed_fp8", WINDOWED_FP8)):
        want = fpsa_attention(q, k, v, grid=grid, config=config, impl="xla")
        fn = jax.jit(
            lambda q, k, v, c=config: ulysses_attention(
                q, k, v, grid=grid, config=c, impl="xla", mesh=mesh
            ),
            in_shardings=(act,) * 3,
            out_shardings=act,
        )
        qs, ks, vs = (jax.device_put(x, act) for x in (q, k, v))
        compiled = fn.lower(qs, ks, vs).compile()
        got, hlo = compiled(qs, ks, vs), compiled.as_text()
        out[name] = {
            "rel": rel(got, want),
            "in_spec": spec_of(qs),
            "out_spec": spec_of(got),
            "seq_all_to_all_shapes": seq_all_to_all_shapes(hlo),
        }
    # Eagerly, with the mesh taken from the context instead of an argument.
    with use_sharding(mesh):
        got = ulysses_attention(q, k, v, grid=grid, impl="xla")
    out["context_mesh_eager_rel"] = rel(got, fpsa_attention(q, k, v, grid=grid, impl="xla"))
    return out


def random_params(cfg: WanConfig, seed: int):
    """Params of the model's shapes drawn on the host, N(0, 0.2^2) (fresh ones have a zero head)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))
    return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def model_checks(mesh, local_shapes: list) -> dict:
    rng = np.random.default_rng(1)
    b = 4
    latents = rng.standard_normal((b, 2, 4, 6, CFG.in_dim)).astype(np.float32)  # grid (2, 2, 3)
    timesteps = rng.uniform(0, 1000, (b,)).astype(np.float32)
    context = rng.standard_normal((b, 5, CFG.text_dim)).astype(np.float32)
    weights = rng.standard_normal(latents.shape[:-1] + (CFG.out_dim,)).astype(np.float32)

    params = random_params(CFG, seed=2)
    model = WanModel(CFG, attention_impl="xla")

    def forward(p, lat, t, ctx):
        return model.apply({"params": p}, lat, t, ctx, attention=WINDOWED)

    def loss(p, lat, t, ctx):
        return jnp.mean(forward(p, lat, t, ctx) * weights)

    grad = jax.grad(loss)
    want_out = jax.jit(forward)(params, latents, timesteps, context)
    want_grad = jax.jit(grad)(params, latents, timesteps, context)

    specs = param_logical_axes(CFG)
    p_sh = logical_to_mesh_sharding(specs, mesh, shapes=params)
    sharded = shard_params(params, mesh, specs)
    video = logical_sharding(("batch", None, None, None, None), mesh)
    in_sh = (p_sh, video, logical_sharding(("batch",), mesh), logical_sharding(("batch",), mesh))
    local_shapes.clear()  # keep only the shapes traced under the mesh
    with use_sharding(mesh):
        fwd = jax.jit(forward, in_shardings=in_sh, out_shardings=video)
        args = (sharded, latents, timesteps, context)
        compiled = fwd.lower(*args).compile()
        got_out, hlo = compiled(*args), compiled.as_text()
        got_grad = jax.jit(grad, in_shardings=in_sh, out_shardings=p_sh)(*args)

    grad_rel = jax.tree.map(rel, got_grad, want_grad)
    fsdp_split = [
        jax.tree_util.keystr(path)
        for path, x in jax.tree_util.tree_leaves_with_path(sharded)
        if "fsdp" in jax.tree.leaves(spec_of(x)) and x.addressable_shards[0].data.shape != x.shape
    ]
    return {
        "forward_rel": rel(got_out, want_out),
        "forward_scale": float(np.abs(np.asarray(want_out)).max()),
        "grad_rel_max": max(jax.tree.leaves(grad_rel)),
        "grad_rel_worst": max(
            (
                (jax.tree_util.keystr(p), r)
                for p, r in jax.tree_util.tree_leaves_with_path(grad_rel)
            ),
            key=lambda x: x[1],
        ),
        "grad_leaves": len(jax.tree.leaves(want_grad)),
        "grad_out_fsdp_leaves": sum(
            "fsdp" in jax.tree.leaves(spec_of(g)) for g in jax.tree.leaves(got_grad)
        ),
        "fsdp_split_params": fsdp_split,
        "seq_all_to_all_shapes": seq_all_to_all_shapes(hlo),
        "out_spec": spec_of(got_out),
    }


def main() -> None:
    if jax.device_count() != 8:
        sys.exit(
            f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), got "
            f"{jax.device_count()}"
        )
    mesh = make_mesh(data=2, fsdp=2, seq=2)
    shapes: list = []
    record_local_shapes(shapes)
    result = {"mesh": dict(mesh.shape), "attention": attention_checks(mesh)}
    result["attention"]["local_shapes"], shapes[:] = list(shapes), []
    result["model"] = model_checks(mesh, shapes)
    result["model"]["local_shapes"] = shapes
    print(json.dumps(result))


if __name__ == "__main__":
    main()
