"""`python -m train.calibrate`: an FPSA step schedule chosen by measurement.

Samples with dense attention (the embedded demo model, or Wan2.1 weights from --ckpt_dir with
--prompts), evaluates candidate operators (windows of several densities x FP8 quantization groups
x FP8 or bf16) at every step and self-attention layer against dense attention on the same inputs
(`fpsa_jax.training.calibration`), and writes the StepSchedule that
`fpsa_jax.attention.calibration.select_schedule` picks: at most --max_phases phases, each with
the sparsest candidate whose worst-layer relative L2 error stays within --max_rel_l2 on every
step of the phase, or the schedule with the smallest such error that meets a mean --density
(that module's docstring has the rule). Beside the JSON: a CSV of every measured error and a
PNG of error against step per candidate (needs matplotlib, in the `notebook` and `test` extras;
without it the PNG is skipped with a note).

    python -m train.calibrate --density 0.35 --output runs/demo-schedule.json
    python -m train.calibrate --ckpt_dir Wan2.1-T2V-1.3B --prompts prompts.txt \\
        --max_rel_l2 0.1 --output wan-480p-calibrated.json

--phase_densities derives windows from density targets instead, with no model (pure arithmetic
on the token grid; how the `wan-480p` / `wan-720p` presets are built).
"""

from __future__ import annotations

import time

from absl import app, flags

from fpsa_jax.attention import IMPLS
from train import calibration

_CKPT_DIR = flags.DEFINE_string(
    "ckpt_dir",
    None,
    "Wan2.1 text-to-video model directory (original or diffusers layout, as `python -m infer` "
    "takes it); needs --prompts. Without it: the embedded demo model (--demo_checkpoint).",
)
_DEMO_CHECKPOINT = flags.DEFINE_string(
    "demo_checkpoint",
    None,
    "Demo checkpoint (.safetensors of fpsa_jax.demo) to calibrate when there is no --ckpt_dir. "
    "Default: the embedded dense-trained model, the one FPSA fine-tuning starts from.",
)
_PROMPTS = flags.DEFINE_string(
    "prompts",
    None,
    "Text file, one prompt per line (blank lines skipped). Required with --ckpt_dir; for the "
    f"demo model the default is {list(calibration.DEMO_PROMPTS)}.",
)
_SEEDS = flags.DEFINE_string(
    "seeds", "0", "Comma-separated noise seeds; every prompt is sampled with every seed."
)
_NEGATIVE_PROMPT = flags.DEFINE_string(
    "negative_prompt", "", "Wan only: negative prompt for CFG; empty = Wan's default."
)
_SIZE = flags.DEFINE_string(
    "size", None, "Wan only: video WIDTH*HEIGHT, multiples of 16. Default: 832*480."
)
_FRAME_NUM = flags.DEFINE_integer("frame_num", None, "Wan only: frames, 4k+1. Default: 81.")
_SAMPLE_STEPS = flags.DEFINE_integer(
    "sample_steps",
    None,
    "Denoising steps to calibrate for (calibrate at the step count you sample with). Default: "
    "the demo model's own (20), 50 for Wan.",
)
_SAMPLE_SHIFT = flags.DEFINE_float(
    "sample_shift", None, "Noise schedule shift > 0. Default: the demo model's (3.0), 5.0 for Wan."
)
_GUIDE_SCALE = flags.DEFINE_float(
    "sample_guide_scale", None, "CFG scale >= 0. Default: the demo model's (4.0), 5.0 for Wan."
)
_SAMPLE_SOLVER = flags.DEFINE_enum("sample_solver", "unipc", ["unipc", "euler"], "Sampler.")
_TILE = flags.DEFINE_string(
    "tile", None, "Compute tile TxHxW in tokens. Default: 3x4x4 (demo), 3x8x8 (Wan presets)."
)
_DENSITIES = flags.DEFINE_string(
    "densities",
    "0.1,0.17,0.25,0.33,0.5,0.67,1",
    "Candidate window densities in (0, 1], comma-separated: for each, the window nearest it on "
    "the token grid (fpsa_jax.attention.tiling.window_for_density; 1 = full window).",
)
_GROUPS = flags.DEFINE_string(
    "groups",
    "1x1x1,1x2x2,2x2x2",
    "Candidate FP8 quantization groups (q_group = k_group: tiles per scale, TxHxW), "
    "comma-separated.",
)
_QUANT = flags.DEFINE_string(
    "quant", "fp8,none", "Candidate quantization: fp8, none (bf16), or both, comma-separated."
)
_SMOOTH_K = flags.DEFINE_enum(
    "smooth_k",
    "off",
    ["off", "on", "both"],
    "FP8 candidates with keys mean-centred before quantizing (FPSAConfig.smooth_k), without "
    "(off), or both, to measure whether centring pays on these weights.",
)
_MAX_REL_L2 = flags.DEFINE_float(
    "max_rel_l2",
    None,
    "Error budget: each phase takes the sparsest candidate whose worst-layer relative L2 error "
    "against dense attention is <= this on every step of the phase. Give this or --density.",
)
_DENSITY = flags.DEFINE_float(
    "density",
    None,
    "Mean density target in (0, 1] (fraction of tiles computed, averaged over steps): the "
    "schedule with the smallest worst error that meets it. Give this or --max_rel_l2.",
)
_MAX_PHASES = flags.DEFINE_integer("max_phases", 3, "At most this many phases (>= 1).")
_PHASE_DENSITIES = flags.DEFINE_string(
    "phase_densities",
    None,
    "Instead of measuring: one density target per phase, comma-separated (e.g. 0.23,0.51,0.31); "
    "each phase's window is the one nearest its target on the token grid (Wan's grid of "
    "--size/--frame_num when either is given, else the demo's). No model is loaded.",
)
_PHASE_ENDS = flags.DEFINE_string(
    "phase_ends", "0.25,0.75,1", "With --phase_densities: each phase's end fraction of the steps."
)
_PHASE_GROUPS = flags.DEFINE_string(
    "phase_groups",
    "2x2x2,1x1x1,1x2x2",
    "With --phase_densities: each phase's FP8 quantization group TxHxW (all phases are FP8).",
)
_OUTPUT = flags.DEFINE_string("output", None, "The StepSchedule JSON to write (.json).")
_PLOT = flags.DEFINE_string(
    "plot", None, "Error-against-step PNG. Default: --output with .png; empty: none."
)
_CSV = flags.DEFINE_string(
    "csv", None, "CSV of every measured error. Default: --output with .csv; empty: none."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace output files that already exist.")
_ATTENTION_IMPL = flags.DEFINE_enum(
    "attention_impl",
    "auto",
    IMPLS,
    "Implementation every operator runs with while measuring (fpsa_jax.attention).",
)

FLAG_NAMES = tuple(
    f.name
    for f in (
        _CKPT_DIR,
        _DEMO_CHECKPOINT,
        _PROMPTS,
        _SEEDS,
        _NEGATIVE_PROMPT,
        _SIZE,
        _FRAME_NUM,
        _SAMPLE_STEPS,
        _SAMPLE_SHIFT,
        _GUIDE_SCALE,
        _SAMPLE_SOLVER,
        _TILE,
        _DENSITIES,
        _GROUPS,
        _QUANT,
        _SMOOTH_K,
        _MAX_REL_L2,
        _DENSITY,
        _MAX_PHASES,
        _PHASE_DENSITIES,
        _PHASE_ENDS,
        _PHASE_GROUPS,
        _OUTPUT,
        _PLOT,
        _CSV,
        _OVERWRITE,
        _ATTENTION_IMPL,
    )
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.perf_counter()
    request = calibration.parse_request({n: flags.FLAGS[n].value for n in FLAG_NAMES})
    for note in request.notes:
        print(note)
    result = calibration.run(request, progress_bar=True)
    print(result.summary)
    for path in result.written:
        print(f"wrote {path}")
    print(f"took {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app.run(main)
