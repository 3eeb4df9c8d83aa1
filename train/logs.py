"""Training logs: one CSV row and one TensorBoard scalar set per logged step.

The CSV (`metrics.csv`) is for quick reading and plotting; the TensorBoard event files are for
`tensorboard --logdir WORKDIR/tb`. A resumed run appends to both. Without tensorboardX (a locked
image, e.g. a GPU machine that cannot install packages) the run warns once and writes the CSV only.
"""

from __future__ import annotations

import csv
from pathlib import Path

from absl import logging

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

    def __init__(self, workdir: Path):
        self.csv_path = workdir / "metrics.csv"
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
            self._tb = SummaryWriter(str(workdir / "tb"))

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
