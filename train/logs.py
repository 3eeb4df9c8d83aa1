"""Training logs: one CSV row and one TensorBoard scalar set per logged step.

The CSV (`metrics.csv`) is for quick reading and plotting; the TensorBoard event files are for
`tensorboard --logdir WORKDIR/tb`. A resumed run appends to both, after dropping what was logged
past the step it resumes from (rows of the CSV rewritten atomically; TensorBoard's purge_step),
so no step appears twice. Without tensorboardX (a locked
image, e.g. a GPU machine that cannot install packages) the run warns once and writes the CSV only.
"""

from __future__ import annotations

import csv
from pathlib import Path

from absl import logging

from fpsa_jax.outputs import atomic_file

FIELDS = (
    "step",
    "loss",
    "grad_norm",
    "learning_rate",
    "phase",
    "phase_loss",
    "step_time_s",
    "tokens_per_s",
)


class MetricsLog:
    """Appends training metrics to WORKDIR/metrics.csv and WORKDIR/tb/ (TensorBoard)."""

    def __init__(self, workdir: Path, resume_step: int = 0):
        self.csv_path = workdir / "metrics.csv"
        if self.csv_path.exists():
            _truncate(self.csv_path, resume_step)
        new = not self.csv_path.exists()
        self._file = self.csv_path.open("a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=FIELDS)
        if new:
            self._csv.writeheader()
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            logging.warning("tensorboardX is not installed: metrics go to %s only", self.csv_path)
            self._tb = None
        else:
            # Events at or after purge_step, from a run that got further than its checkpoint,
            # are hidden from TensorBoard.
            self._tb = SummaryWriter(str(workdir / "tb"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        row = {k: metrics.get(k, "") for k in FIELDS}
        row["step"] = step
        self._csv.writerow(row)
        self._file.flush()
        if self._tb is None:
            return
        for name, value in metrics.items():
            if name == "phase":
                continue
            tag = f"phase_{int(metrics['phase'])}/loss" if name == "phase_loss" else f"train/{name}"
            self._tb.add_scalar(tag, float(value), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        self._file.close()


def _truncate(path: Path, step: int) -> None:
    """Keeps the header and the rows of steps <= `step` (rewritten only when some go)."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    keep = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if len(keep) == len(rows) - 1:
        return
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        csv.writer(f).writerows([rows[0], *keep] if rows else [FIELDS])
