"""Wan2.1's flow-matching samplers (UniPC, Euler) and the CFG denoising loop with per-step FPSA."""

from fpsa_jax.sampling.euler import EulerState, euler_init, euler_step, euler_tables
from fpsa_jax.sampling.loop import (
    SOLVER_NAMES,
    SOLVERS,
    Segment,
    Solver,
    SolverName,
    sample,
    step_segments,
    wan_model_fn,
)
from fpsa_jax.sampling.probe import AttentionCall, attention_probe
from fpsa_jax.sampling.schedule import FlowSchedule, flow_schedule
from fpsa_jax.sampling.unipc import UniPCState, unipc_init, unipc_step, unipc_tables

__all__ = [
    "SOLVERS",
    "SOLVER_NAMES",
    "AttentionCall",
    "EulerState",
    "FlowSchedule",
    "Segment",
    "Solver",
    "SolverName",
    "UniPCState",
    "attention_probe",
    "euler_init",
    "euler_step",
    "euler_tables",
    "flow_schedule",
    "sample",
    "step_segments",
    "unipc_init",
    "unipc_step",
    "unipc_tables",
    "wan_model_fn",
]
