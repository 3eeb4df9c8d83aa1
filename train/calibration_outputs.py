"""The files and lines `python -m train.calibrate` writes: the CSV of measured errors, the
error-against-step PNG, the summary, a progress bar, and writing several files all or none."""

from __future__ import annotations

import csv
import io
import os
import secrets
from pathlib import Path

import numpy as np

from fpsa_jax.attention import StepSchedule
from fpsa_jax.attention.calibration import Calibration, StepErrors, candidate_label


def writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def write_all(files: dict[Path, str | bytes]) -> tuple[Path, ...]:
    """Writes every {path: text or bytes} or none: each goes to a temporary file beside its
    path first (created with the usual permissions, umask applied), and only when all are
    written are they renamed into place. Parent folders are created."""
    temps: dict[Path, Path] = {}
    try:
        for path, content in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            temps[path] = tmp
            data = content.encode() if isinstance(content, str) else content
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)  # left only when something failed
    return tuple(files)


def chosen_candidates(errors: StepErrors, calibration: Calibration) -> np.ndarray:
    """int [num_steps]: the index in errors.candidates that each step's phase uses."""
    out = np.empty(errors.num_steps, np.int64)
    for p in calibration.phases:
        out[p.start : p.stop] = errors.candidates.index(p.config)
    return out


def errors_csv(errors: StepErrors, calibration: Calibration) -> str:
    """One row per (step, candidate): its density, worst-layer and mean-layer rel. L2 error, and
    whether the schedule uses it at that step."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["step", "candidate", "quant", "window", "q_group", "smooth_k", "density",
         "rel_l2_worst_layer", "rel_l2_mean_layer", "chosen"]
    )  # fmt: skip
    worst, mean = errors.step_rel_l2, errors.rel_l2.mean(axis=1)
    chosen = chosen_candidates(errors, calibration)
    for step in range(errors.num_steps):
        for c, cfg in enumerate(errors.candidates):
            w.writerow(
                [
                    step,
                    candidate_label(cfg, errors.grid),
                    "dense" if cfg is None else cfg.quant,
                    "" if cfg is None or cfg.window is None else "x".join(map(str, cfg.window)),
                    "" if cfg is None else "x".join(map(str, cfg.q_group)),
                    "" if cfg is None else int(cfg.smooth_k),
                    f"{errors.densities[c]:.6g}",
                    f"{worst[step, c]:.6g}",
                    f"{mean[step, c]:.6g}",
                    int(chosen[step] == c),
                ]
            )
    return buf.getvalue()


def errors_png(errors: StepErrors, calibration: Calibration, what: str) -> bytes:
    """The paper's figure: each candidate's worst-layer error against step (colour = density,
    dashed = bf16), the chosen schedule's in black, the phases shaded, the budget dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(errors.num_steps)
    worst = errors.step_rel_l2
    fig, ax = plt.subplots(figsize=(10, 5))
    cmap = plt.get_cmap("viridis")
    for c, cfg in enumerate(errors.candidates):
        if cfg is None:
            continue
        ax.plot(
            steps,
            worst[:, c],
            color=cmap(errors.densities[c]),
            ls="--" if cfg.quant == "none" else "-",
            lw=0.9,
            label=candidate_label(cfg, errors.grid),
        )
    chosen = chosen_candidates(errors, calibration)
    ax.plot(steps, worst[steps, chosen], "k-o", ms=3, lw=2, label="chosen schedule")
    ax.axhline(calibration.budget, color="k", ls=":", lw=1, label="budget")
    for i, p in enumerate(calibration.phases):
        ax.axvspan(p.start - 0.5, p.stop - 0.5, color="0.9" if i % 2 else "0.97", zorder=0)
    positive = worst[np.isfinite(worst) & (worst > 0)]
    if positive.size:
        ax.set_yscale("log")
    ax.set_xlabel("denoising step (0 = noisiest)")
    ax.set_ylabel("rel. L2 error vs dense (worst layer)")
    ax.set_title(f"{what}: mean density {calibration.mean_density:.1%}", fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def describe_schedule(schedule: StepSchedule, grid) -> str:
    """One line per phase: its end fraction and operator (density on `grid`)."""
    lines = [f"schedule for the token grid {tuple(grid)}:"]
    for p in schedule.phases:
        lines.append(
            f"  until {p.end_fraction:.3g} of the steps: {candidate_label(p.config, grid)}"
        )
    return "\n".join(lines)


def describe_calibration(errors: StepErrors, calibration: Calibration, what: str, request) -> str:
    target = (
        f"--max_rel_l2 {request.max_rel_l2:g}"
        if request.max_rel_l2 is not None
        else f"--density {request.density:g}"
    )
    lines = [
        f"measured {len(errors.candidates)} candidates on {errors.num_steps} steps of {what} "
        f"(token grid {errors.grid}), for {target}:"
    ]
    for p in calibration.phases:
        lines.append(
            f"  steps {p.start:>2}-{p.stop - 1:<2} {candidate_label(p.config, errors.grid):<44} "
            f"worst rel. L2 {p.max_rel_l2:.4f}, mean {p.mean_rel_l2:.4f}"
        )
    lines.append(
        f"mean density over steps {calibration.mean_density:.1%}; worst error "
        f"{calibration.max_rel_l2:.4f} (budget {calibration.budget:.4f})"
    )
    return "\n".join(lines)


class _Bar:
    """A tqdm bar over all measured steps; `update_to` is the sampling progress hook."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc="calibrating", unit="step")

    def update_to(self, done: int, total: int) -> None:
        self._bar.total, self._bar.n = total, done
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def progress_bar(total: int) -> _Bar:
    return _Bar(total)
