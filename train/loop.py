"""The training loop: state (fresh or resumed), data, one jitted step per FPSA phase, logs and
checkpoints. Everything with side effects lives here; the math is `fpsa_jax.training`."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from fpsa_jax.attention import FPSAConfig, Impl, check_impl
from fpsa_jax.config import LINEAR_QUANTS, WanConfig
from fpsa_jax.data import Loader, StandInEncoder, SyntheticLatentSource
from fpsa_jax.demo.task import DemoSource
from fpsa_jax.model.fp8_linear import is_quantized
from fpsa_jax.model.wan import init_params, param_logical_axes
from fpsa_jax.parallel import check_mesh_shape, logical_to_mesh_sharding, make_mesh, use_sharding
from fpsa_jax.seeds import check_seed, seed_key
from fpsa_jax.training import (
    TrainConfig,
    TrainState,
    init_train_state,
    make_optimizer,
    sample_phase,
    train_step,
)
from train.checkpoints import Checkpoints, check_workdir
from train.logs import MetricsLog
from train.prefetch import Prefetch
from train.resume import resume


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What one training run needs besides the hyper-parameters in `train_config`.

    init: "preset" (fresh weights of model_config) or a checkpoint path (a directory written by
      `python -m fpsa_jax.convert`, a demo checkpoint (fpsa_jax.demo), or anything
      `load_wan_checkpoint` reads).
    data: "synthetic" (stand-in latents of synthetic clips, no files), "demo" (the demo task's
      pixel clips, fpsa_jax.demo.task; fixed 9 x 32 x 32) or a records directory written by
      `python -m train.prepare`.
    frames, height, width: video size of the synthetic source (pixels, 4k+1 frames).
    mesh_shape: (data, fsdp, seq) over the first data*fsdp*seq devices; batch over data x fsdp,
      parameters and optimizer state FSDP over fsdp, self-attention sequence-parallel over seq.
    remat: the DiT's per-block rematerialisation policy (WanConfig.remat) for training.
    attention_impl: the FPSA operator's implementation, checked here (before any weights load).
    linear_quant: WanConfig.linear_quant for training ("fp8": QAT of the block linears, fake
      quantized with straight-through gradients), checked here too; None keeps the model's
      own.
    """

    workdir: Path
    model_config: WanConfig
    train_config: TrainConfig
    init: str = "preset"
    data: str = "synthetic"
    batch_size: int = 1
    num_steps: int = 100
    save_every: int = 50
    keep: int = 3
    log_every: int = 1
    seed: int = 0
    frames: int = 17
    height: int = 64
    width: int = 64
    attention_impl: Impl = "xla"
    mesh_shape: tuple[int, int, int] = (1, 1, 1)
    remat: str = "full"
    linear_quant: str | None = None

    def __post_init__(self):
        check_impl(self.attention_impl)
        check_seed(self.seed, "RunSettings.seed")
        if self.linear_quant not in (None, *LINEAR_QUANTS):
            raise ValueError(
                f"RunSettings.linear_quant must be None or one of {LINEAR_QUANTS}, got "
                f"{self.linear_quant!r}"
            )


def initial_config(settings: RunSettings) -> WanConfig:
    """The WanConfig of the run's initial weights, read without them (the preset, a converted
    checkpoint's config.json, a demo checkpoint's header, a Wan checkpoint's tensor headers).
    Raises FileNotFoundError or ValueError (CheckpointError) for what cannot be read."""
    if settings.init == "preset":
        return settings.model_config
    from fpsa_jax.convert.checkpoint import read_wan_config
    from fpsa_jax.demo import is_demo_checkpoint
    from fpsa_jax.demo.checkpoint import read_demo_config

    path = Path(settings.init)
    if (path / "params").is_dir() and (path / "config.json").is_file():
        return WanConfig.load(path / "config.json")
    if is_demo_checkpoint(path):
        return read_demo_config(path)
    return read_wan_config(path)


def sample_shape(settings: RunSettings, config: WanConfig) -> tuple[int, ...]:
    """[1, f, h, w, C] of one training sample of `settings.data`, known before any is read."""
    if settings.data == "demo":
        from fpsa_jax.demo import task

        return (1, task.FRAMES, task.HEIGHT, task.WIDTH, 3)
    if settings.data == "synthetic":
        from fpsa_jax.pipeline import latent_shape

        return latent_shape(1, settings.width, settings.height, settings.frames, config.in_dim)
    index = json.loads((Path(settings.data) / "index.json").read_text())
    return (1, *index["latent_shape"])


def check_mesh(settings: RunSettings, config: WanConfig) -> None:
    """ValueError when settings.mesh_shape cannot run the model of `config` on the batches of
    `settings` here (`fpsa_jax.parallel.check_mesh_shape`: devices, batch, heads, tokens)."""
    check_mesh_shape(
        settings.mesh_shape,
        devices=jax.device_count(),
        batch=settings.batch_size,
        heads=config.num_heads,
        tokens=_tokens_per_sample(sample_shape(settings, config), config),
    )


def _initial_params(settings: RunSettings) -> tuple[WanConfig, Any]:
    if settings.init == "preset":
        key = seed_key(settings.seed)
        return settings.model_config, init_params(settings.model_config, key)
    from fpsa_jax.convert import load_converted, load_wan_checkpoint
    from fpsa_jax.demo import is_demo_checkpoint, load_demo

    path = Path(settings.init)
    if (path / "params").is_dir() and (path / "config.json").is_file():
        config, params = load_converted(path)
        if is_quantized(params):
            raise ValueError(
                f"{path} holds FP8 block linears (converted with --linear_quant fp8); training "
                "needs the float weights: convert without --linear_quant (QAT of the linears is "
                "python -m train --linear_quant fp8)"
            )
        return config, params
    if is_demo_checkpoint(path):
        demo = load_demo(path)
        return demo.config, demo.params
    return load_wan_checkpoint(path, jnp.float32)


def _data_source(settings: RunSettings, config: WanConfig, state: dict | None):
    if settings.data == "demo":
        return DemoSource(
            settings.batch_size,
            text_len=config.text_len,
            seed=settings.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            state=state,
        )
    if settings.data == "synthetic":
        encoder = StandInEncoder(text_dim=config.text_dim, latent_channels=config.in_dim)
        return SyntheticLatentSource(
            settings.batch_size,
            frames=settings.frames,
            height=settings.height,
            width=settings.width,
            text_len=config.text_len,
            encoder=encoder,
            seed=settings.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            state=state,
        )
    return Loader(
        settings.data,
        batch_size=settings.batch_size,
        text_len=config.text_len,
        seed=settings.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        state=state,
    )


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the state and the batches live on the mesh."""

    mesh: Mesh
    state: Any  # NamedSharding tree shaped like the TrainState
    batch: NamedSharding


def _layout(settings: RunSettings, config: WanConfig, state: TrainState) -> _Layout:
    size = int(np.prod(settings.mesh_shape))
    if size > jax.device_count():
        raise ValueError(
            f"mesh {settings.mesh_shape} needs {size} devices, {jax.device_count()} available"
        )
    mesh = make_mesh(*settings.mesh_shape, devices=jax.devices()[:size])
    replicated = NamedSharding(mesh, P())
    params = logical_to_mesh_sharding(param_logical_axes(config), mesh, shapes=state.params)
    opt_state = optax.tree_map_params(
        make_optimizer(settings.train_config),
        lambda _, sharding: sharding,
        state.opt_state,
        params,
        transform_non_params=lambda _: replicated,
    )
    shardings = TrainState(
        step=replicated, params=params, opt_state=opt_state, ema_params=params, rng=replicated
    )
    return _Layout(mesh, shardings, NamedSharding(mesh, P(("data", "fsdp"))))


def _step_programs(
    model_config: WanConfig, train_config: TrainConfig, impl: Impl, layout: _Layout
) -> Callable[[FPSAConfig | None], Callable]:
    """attention -> the jitted train step of one run for that FPSA operator, made once per
    operator (a three-phase schedule compiles three times). The cache belongs to the run: it
    and its programs go when the run ends, so runs in one process do not accumulate them."""

    @functools.cache
    def program(attention: FPSAConfig | None):
        step = functools.partial(
            train_step,
            model_config=model_config,
            train_config=train_config,
            attention=attention,
            impl=impl,
        )
        return jax.jit(
            step,
            in_shardings=(layout.state, layout.batch),  # every batch array split along B
            donate_argnums=0,
            out_shardings=(layout.state, NamedSharding(layout.mesh, P())),
        )

    return program


def run(settings: RunSettings) -> dict[str, float]:
    """Trains to `settings.num_steps`, resuming from the latest checkpoint in the workdir.

    Returns the last logged metrics. Checkpoints every `save_every` steps and at the end. The
    workdir is checked (writable, room for a checkpoint where the model is known) and the mesh
    against the devices, the batch and the model (`check_mesh`) before any
    weights load; resuming is `train.resume.resume` (raises ResumeError).
    """
    workdir = settings.workdir
    check_workdir(workdir, settings.model_config if settings.init == "preset" else None)
    check_mesh(settings, initial_config(settings))
    workdir.mkdir(parents=True, exist_ok=True)
    config, params = _initial_params(settings)
    config = config.replace(remat=settings.remat)
    if settings.linear_quant is not None:
        config = config.replace(linear_quant=settings.linear_quant)
    train_config = settings.train_config
    state = init_train_state(config, train_config, params, seed_key(settings.seed))
    del params
    layout = _layout(settings, config, state)
    state = jax.device_put(state, layout.state)
    programs = _step_programs(config, train_config, settings.attention_impl, layout)
    meta = {"model_config": config.to_dict(), "train_config": train_config.to_dict()}

    check_workdir(workdir, config)  # with the real model's size, now that it is known

    checkpoints = Checkpoints(workdir, settings.keep)
    try:
        resumed = resume(checkpoints, state, meta, workdir)
    except BaseException:
        checkpoints.close()
        raise
    first, state, data_state = resumed.step, resumed.state, resumed.data
    batches = Prefetch(_data_source(settings, config, data_state))
    log = MetricsLog(workdir, resume_step=first)
    tokens = None
    last: dict[str, float] = {}
    try:
        for step in tqdm(
            range(first, settings.num_steps),
            initial=first,
            total=settings.num_steps,
            desc="training",
            unit="step",
        ):
            # The phase/sigma draw depends on (seed, step) only, so a resumed run draws the same.
            key = jax.random.fold_in(seed_key(settings.seed + 1), step)
            phase, sigmas, attention = sample_phase(key, settings.batch_size, train_config)
            batch, data_state = next(batches)
            arrays = {
                "latents": np.asarray(batch.latents, np.float32),
                "context": np.asarray(batch.context),
                "sigmas": np.asarray(sigmas),
            }
            # Extra input channels (the demo's position channels) only for a model that takes them.
            if batch.condition is not None and config.in_dim > batch.latents.shape[-1]:
                arrays["condition"] = np.asarray(batch.condition, np.float32)
            inputs = jax.device_put(arrays, layout.batch)
            tokens = tokens or _tokens_per_sample(batch.latents.shape, config)
            start = time.perf_counter()
            with use_sharding(layout.mesh):  # traced (first call per phase) under the rules
                state, metrics = programs(attention)(state, inputs)
            metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
            elapsed = time.perf_counter() - start
            if (step + 1) % settings.log_every == 0 or step + 1 == settings.num_steps:
                last = {
                    **metrics,
                    "phase": phase,
                    "phase_loss": metrics["loss"],
                    "step_time_s": elapsed,
                    "tokens_per_s": tokens * settings.batch_size / elapsed,
                }
                log.write(step + 1, last)
            if (step + 1) % settings.save_every == 0 or step + 1 == settings.num_steps:
                checkpoints.save(step + 1, state, data_state, meta)
    finally:
        batches.close()
        checkpoints.close()
        log.close()
    return last


def _tokens_per_sample(latent_shape: tuple[int, ...], config: WanConfig) -> int:
    _, f, h, w, _ = latent_shape
    pt, ph, pw = config.patch_size
    return int(np.prod((f // pt, h // ph, w // pw)))
