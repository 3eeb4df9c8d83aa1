"""Run by test_sequence_parallel_sampling in a subprocess with 8 forced CPU devices: the denoising
loop on a (data=2, fsdp=1, seq=2) mesh against one device; prints JSON."""

import functools
import json
import os
import sys
from pathlib import Path

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import fpsa_jax.parallel.ulysses as ulysses  # noqa: E402
from fpsa_jax import pipeline  # noqa: E402
from fpsa_jax.attention import FPSAConfig, Phase, StepSchedule  # noqa: E402
from fpsa_jax.config import WanConfig  # noqa: E402
from fpsa_jax.convert import T2VWeights  # noqa: E402
from fpsa_jax.model import wan  # noqa: E402
from fpsa_jax.model.random_weights import random_weights  # noqa: E402
from fpsa_jax.parallel import make_mesh  # noqa: E402

seen = []
_attention = ulysses.fpsa_attention


def _spy(q, k, v, **kw):
    seen.append(list(q.shape))  # what each device's attention sees, inside shard_map
    return _attention(q, k, v, **kw)


ulysses.fpsa_attention = _spy
config = WanConfig.preset("tiny", dtype="float32")
weights = T2VWeights(
    config,
    random_weights(functools.partial(wan.init_params, config), jax.random.key(0)),
    None,
    None,
)
noise = jax.random.normal(jax.random.key(1), (1, 2, 4, 8, 16))
context = jax.random.normal(jax.random.key(2), (1, 5, config.text_dim))
schedule = StepSchedule(
    (Phase(0.5, FPSAConfig(tile=(1, 2, 2), window=(1, 1, 2), quant="fp8")), Phase(1.0, None))
)
kw = dict(num_steps=4, shift=5.0, guide_scale=5.0, schedule=schedule, attention_impl="xla")
seen.clear()
sharded = pipeline.denoise(
    weights,
    noise,
    context,
    context * 0,
    **kw,
    mesh=make_mesh(data=2, seq=2, devices=jax.devices()[:4]),
)
inside = seen[:]
single = pipeline.denoise(weights, noise, context, context * 0, **kw)
print(
    json.dumps(
        {
            "inside": inside,
            "rel": float(jnp.abs(sharded - single).max() / jnp.abs(single).max()),
        }
    )
)
