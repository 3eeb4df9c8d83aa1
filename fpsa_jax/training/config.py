"""`TrainConfig`: the hyper-parameters of quantization-aware flow-matching fine-tuning, as data.

Defaults follow the FPSAttention paper's recipe (REFERENCE.md, "The paper's training recipe"):
lr 5e-6 after 200 warmup steps, AdamW with weight decay 1e-4 and eps 1e-15, gradient clipping at
1.0, EMA 0.99, text dropout 0.1. Where the paper is silent (sigma sampling, the schedule after
warmup, accumulation, mixed precision) the defaults are Wan-style choices: shifted-uniform sigmas
with shift 5, a constant learning rate, bf16 compute from float32 master parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, get_args

from fpsa_jax.attention.schedule import StepSchedule
from fpsa_jax.json_config import JsonConfig
from fpsa_jax.ranges import Range
from fpsa_jax.sampling.schedule import flow_schedule

SigmaSampling = Literal["shifted", "logit_normal"]
SIGMA_SAMPLINGS: tuple[str, ...] = get_args(SigmaSampling)
LrSchedule = Literal["constant", "cosine"]
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)
ComputeDtype = Literal["bfloat16", "float32"]
COMPUTE_DTYPES: tuple[str, ...] = get_args(ComputeDtype)


@dataclasses.dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """One training run's hyper-parameters (frozen, hashable: usable as a static jit argument).

    Attributes:
      learning_rate: peak learning rate, reached at the end of the warmup.
      warmup_steps: optimizer updates of linear warmup; update k < warmup_steps uses
        learning_rate * k / warmup_steps (so update 0 uses 0, as in diffusers' warmup schedules).
      lr_schedule: after warmup, "constant" or "cosine" (from learning_rate down to
        min_learning_rate at update total_steps, then flat).
      total_steps: optimizer updates of the whole run; required by "cosine", else unused.
      min_learning_rate: the cosine's floor.
      weight_decay: AdamW's decoupled decay (multiplied by the learning rate, as torch's AdamW),
        applied to every parameter.
      adam_b1, adam_b2, adam_eps: Adam's moment decays and epsilon.
      grad_clip_norm: clip the (accumulated) gradient to this global norm; None disables clipping.
      ema_decay: ema = ema_decay * ema + (1 - ema_decay) * params after every optimizer update.
      text_dropout: probability that a sample's text context is replaced by the null context
        (classifier-free guidance training).
      grad_accum_steps: micro-batches per optimizer update (optax.MultiSteps when > 1).
      sigma_sampling: "shifted" (u ~ U(0, 1), sigma = s u / (1 + (s - 1) u) with s = sigma_shift)
        or "logit_normal" (sigma = sigmoid(logit_normal_mean + logit_normal_std * z), z ~ N(0, 1)).
      sigma_shift: s of the "shifted" sampler.
      logit_normal_mean, logit_normal_std: parameters of the "logit_normal" sampler.
      compute_dtype: dtype of the forward's matmuls and attention ("bfloat16" or "float32"); the
        master parameters, optimizer state and EMA stay float32.
      cast_params: cast the whole parameter tree to compute_dtype before the forward (like torch
        FSDP's mixed precision; halves parameter all-gathers). False keeps float32 parameters and
        lets each layer cast at use, so Wan's float32 islands read float32 weights. Gradients
        reach the float32 masters either way.
      num_inference_steps, inference_shift: the sampling schedule (fpsa_jax.sampling.flow_schedule)
        whose steps map a training sigma to a phase of `schedule`, so training sees inference's
        operator.
      schedule: the step-aware FPSA schedule, or None for dense attention at every sigma.
    """

    learning_rate: float = 5e-6
    warmup_steps: int = 200
    lr_schedule: LrSchedule = "constant"
    total_steps: int | None = None
    min_learning_rate: float = 0.0
    weight_decay: float = 1e-4
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-15
    grad_clip_norm: float | None = 1.0
    ema_decay: float = 0.99
    text_dropout: float = 0.1
    grad_accum_steps: int = 1
    sigma_sampling: SigmaSampling = "shifted"
    sigma_shift: float = 5.0
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    compute_dtype: ComputeDtype = "bfloat16"
    cast_params: bool = True
    num_inference_steps: int = 50
    inference_shift: float = 5.0
    schedule: StepSchedule | None = None

    def __post_init__(self):
        _check_real(self, "learning_rate", lo=0.0, lo_open=True)
        _check_int(self, "warmup_steps", lo=0)
        _check_choice(self, "lr_schedule", LR_SCHEDULES)
        if self.total_steps is not None:
            _check_int(self, "total_steps", lo=1)
        if self.lr_schedule == "cosine" and (
            self.total_steps is None or self.total_steps <= self.warmup_steps
        ):
            raise ValueError(
                f"TrainConfig.total_steps must be an int > warmup_steps ({self.warmup_steps}) "
                f"with lr_schedule='cosine', got {self.total_steps!r}"
            )
        _check_real(self, "min_learning_rate", lo=0.0, hi=self.learning_rate)
        _check_real(self, "weight_decay", lo=0.0)
        _check_real(self, "adam_b1", lo=0.0, hi=1.0, hi_open=True)
        _check_real(self, "adam_b2", lo=0.0, hi=1.0, hi_open=True)
        _check_real(self, "adam_eps", lo=0.0, lo_open=True)
        if self.grad_clip_norm is not None:
            _check_real(self, "grad_clip_norm", lo=0.0, lo_open=True)
        _check_real(self, "ema_decay", lo=0.0, hi=1.0)
        _check_real(self, "text_dropout", lo=0.0, hi=1.0)
        _check_int(self, "grad_accum_steps", lo=1)
        _check_choice(self, "sigma_sampling", SIGMA_SAMPLINGS)
        _check_real(self, "sigma_shift", lo=0.0, lo_open=True)
        _check_real(self, "logit_normal_mean")
        _check_real(self, "logit_normal_std", lo=0.0, lo_open=True)
        _check_choice(self, "compute_dtype", COMPUTE_DTYPES)
        if not isinstance(self.cast_params, bool):
            raise ValueError(f"TrainConfig.cast_params must be a bool, got {self.cast_params!r}")
        _check_int(self, "num_inference_steps", lo=1)
        _check_real(self, "inference_shift", lo=0.0, lo_open=True)
        try:
            flow_schedule(self.num_inference_steps, self.inference_shift)
        except ValueError as e:
            raise ValueError(f"TrainConfig.inference_shift / num_inference_steps: {e}") from None
        if self.schedule is not None and not isinstance(self.schedule, StepSchedule):
            raise ValueError(
                f"TrainConfig.schedule must be a StepSchedule or None, "
                f"got {type(self.schedule).__name__}"
            )

    @property
    def num_phases(self) -> int:
        """Phases of `schedule` (1 when dense): the number of train-step specialisations."""
        return 1 if self.schedule is None else len(self.schedule.phases)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def _from_json_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        if isinstance(fields.get("schedule"), Mapping):  # nested as StepSchedule.to_dict
            fields["schedule"] = StepSchedule.from_dict(fields["schedule"])
        return fields


def _check_real(cfg, name, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    value = Range(lo, hi, lo_open, hi_open).check(f"TrainConfig.{name}", getattr(cfg, name))
    object.__setattr__(cfg, name, value)


def _check_int(cfg, name, lo) -> None:
    value = Range(lo, integer=True).check(f"TrainConfig.{name}", getattr(cfg, name))
    object.__setattr__(cfg, name, value)


def _check_choice(cfg, name, choices) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f"TrainConfig.{name} must be one of {choices}, got {value!r}")
