"""The FPSA operator: tiles, windows, FP8 quantization, step schedules and the impl registry."""

from fpsa_jax.attention.api import IMPLS, Impl, check_impl, fpsa_attention
from fpsa_jax.attention.config import FPSAConfig
from fpsa_jax.attention.mask import MaskInfo, build_mask_info
from fpsa_jax.attention.metrics import AttentionErrors, error_report
from fpsa_jax.attention.quant import QuantizedTensor
from fpsa_jax.attention.schedule import Phase, StepSchedule

__all__ = [
    "IMPLS",
    "AttentionErrors",
    "FPSAConfig",
    "Impl",
    "MaskInfo",
    "Phase",
    "QuantizedTensor",
    "StepSchedule",
    "build_mask_info",
    "check_impl",
    "error_report",
    "fpsa_attention",
]
