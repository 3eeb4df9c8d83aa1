"""FP8 block linears on a (data=2, fsdp=2, seq=2) mesh of 8 forced CPU devices (see
test_multidevice_fp8.py); prints one JSON object:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.parallel.multidevice_fp8
"""

import json
import sys

import jax
import numpy as np

from fpsa_jax.model.fp8_linear import quantize_linear_weights
from fpsa_jax.model.wan import WanModel, param_logical_axes
from fpsa_jax.parallel import logical_sharding, logical_to_mesh_sharding, make_mesh, use_sharding
from tests.parallel.multidevice_checks import CFG, WINDOWED, random_params, rel, spec_of

CFG8 = CFG.replace(linear_quant="fp8")


def main() -> None:
    if jax.device_count() != 8:
        sys.exit(f"needs 8 devices, got {jax.device_count()}")
    mesh = make_mesh(data=2, fsdp=2, seq=2)
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((4, 2, 4, 6, CFG.in_dim)).astype(np.float32)
    timesteps = rng.uniform(0, 1000, (4,)).astype(np.float32)
    context = rng.standard_normal((4, 5, CFG.text_dim)).astype(np.float32)
    params = random_params(CFG, seed=2)
    quantized = quantize_linear_weights(params)
    model = WanModel(CFG8, attention_impl="xla", linear_impl="emulated")

    def forward(p, lat, t, ctx):
        return model.apply({"params": p}, lat, t, ctx, attention=WINDOWED)

    want = jax.jit(forward)(quantized, latents, timesteps, context)
    float_sh = logical_to_mesh_sharding(param_logical_axes(CFG), mesh, shapes=params)
    fp8_sh = logical_to_mesh_sharding(
        param_logical_axes(CFG8, quantized=True), mesh, shapes=quantized
    )
    sharded = jax.device_put(quantized, fp8_sh)
    video = logical_sharding(("batch", None, None, None, None), mesh)
    batch = logical_sharding(("batch",), mesh)
    with use_sharding(mesh):
        fwd = jax.jit(forward, in_shardings=(fp8_sh, video, batch, batch), out_shardings=video)
        got = fwd(sharded, latents, timesteps, context)

    linears = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(sharded["blocks"]):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']") or name.endswith("['kernel_scale']"):
            linears[name] = {
                "dtype": str(leaf.dtype),
                "spec": spec_of(leaf),
                "local_shape": list(leaf.addressable_shards[0].data.shape),
            }
    float_specs = {
        jax.tree_util.keystr(path): spec_of_sharding(s)
        for path, s in jax.tree_util.tree_leaves_with_path(float_sh["blocks"])
    }
    print(
        json.dumps(
            {
                "forward_rel": rel(got, want),
                "forward_scale": float(np.abs(np.asarray(want)).max()),
                "linears": linears,
                "float_specs": float_specs,
            }
        )
    )


def spec_of_sharding(sharding) -> list:
    return [list(e) if isinstance(e, tuple) else e for e in sharding.spec]


if __name__ == "__main__":
    main()
