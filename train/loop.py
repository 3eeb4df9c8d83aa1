"""The training loop: state (fresh or resumed), data, one jitted step per FPSA phase, logs and
checkpoints. Everything with side effects lives here; the math is `fpsa_jax.training`."""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from fpsa_jax.config import WanConfig
from fpsa_jax.data import Loader, StandInEncoder, SyntheticLatentSource
from fpsa_jax.model.wan import init_params
from fpsa_jax.training import (
    TrainConfig,
    init_train_state,
    phase_attention,
    sample_phase_and_sigmas,
    train_step,
)
from train.checkpoints import Checkpoints
from train.logs import MetricsLog


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What one training run needs besides the hyper-parameters in `train_config`.

    init: "preset" (fresh weights of model_config) or a checkpoint path (a directory written by
      `python -m fpsa_jax.convert`, or anything `load_wan_checkpoint` reads).
    data: "synthetic" (stand-in latents of synthetic clips, no files) or a records directory
      written by `python -m train.prepare`.
    frames, height, width: video size of the synthetic source (pixels, 4k+1 frames).
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
    attention_impl: str = "xla"


def _initial_params(settings: RunSettings) -> tuple[WanConfig, Any]:
    if settings.init == "preset":
        key = jax.random.key(settings.seed)
        return settings.model_config, init_params(settings.model_config, key)
    from fpsa_jax.convert import load_converted, load_wan_checkpoint

    path = Path(settings.init)
    if (path / "params").is_dir() and (path / "config.json").is_file():
        return load_converted(path)
    return load_wan_checkpoint(path, jnp.float32)


def _data_source(settings: RunSettings, config: WanConfig, state: dict | None):
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


@functools.cache
def _compiled_step(model_config, train_config, attention, impl):
    # One program per distinct FPSA operator: a three-phase schedule compiles three times.
    return jax.jit(
        functools.partial(
            train_step,
            model_config=model_config,
            train_config=train_config,
            attention=attention,
            impl=impl,
        ),
        donate_argnums=0,
    )


def run(settings: RunSettings) -> dict[str, float]:
    """Trains to `settings.num_steps`, resuming from the latest checkpoint in the workdir.

    Returns the last logged metrics. Checkpoints every `save_every` steps and at the end.
    """
    workdir = settings.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    config, params = _initial_params(settings)
    train_config = settings.train_config
    state = init_train_state(config, train_config, params, jax.random.key(settings.seed))
    del params
    meta = {"model_config": config.to_dict(), "train_config": train_config.to_dict()}

    checkpoints = Checkpoints(workdir, settings.keep)
    first = checkpoints.latest_step() or 0
    data_state = None
    if first:
        state, data_state, saved_meta = checkpoints.restore(first, state)
        if saved_meta["model_config"] != meta["model_config"]:
            raise ValueError(
                f"{workdir} holds checkpoints of another model config: "
                f"{saved_meta['model_config']}; use a new --workdir"
            )
        print(f"resuming from step {first} in {workdir}")
    source = _data_source(settings, config, data_state)
    batches = iter(source)
    log = MetricsLog(workdir)
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
            key = jax.random.fold_in(jax.random.key(settings.seed + 1), step)
            phase, sigmas = sample_phase_and_sigmas(key, settings.batch_size, train_config)
            attention = phase_attention(train_config, phase)
            batch = next(batches)
            inputs = {
                "latents": jnp.asarray(batch.latents, jnp.float32),
                "context": jnp.asarray(batch.context),
                "sigmas": sigmas,
            }
            tokens = tokens or _tokens_per_sample(batch.latents.shape, config)
            start = time.perf_counter()
            step_fn = _compiled_step(config, train_config, attention, settings.attention_impl)
            state, metrics = step_fn(state, inputs)
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
                checkpoints.save(step + 1, state, source.state(), meta)
    finally:
        checkpoints.close()
        log.close()
    return last


def _tokens_per_sample(latent_shape: tuple[int, ...], config: WanConfig) -> int:
    _, f, h, w, _ = latent_shape
    pt, ph, pw = config.patch_size
    return int(np.prod((f // pt, h // ph, w // pw)))
