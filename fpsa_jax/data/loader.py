"""Fixed-shape, shuffled, host-sharded, resumable batches from a records directory.

Each epoch visits the N examples in one order: a permutation seeded by (seed, epoch), or index
order without shuffling. Global step s of an epoch takes positions [s * P * B, (s + 1) * P * B)
of that order, P = process_count hosts, B = per-host batch size; host p gets the p-th block of B.
So hosts see disjoint examples, all hosts take the same number of steps, and an epoch has
N // (P * B) steps: the last N mod (P * B) examples of each epoch's order are skipped (different
ones every epoch when shuffling).

`Loader.state()` is a small JSON-able dict (epoch, step and what they are valid for);
`Loader(..., state=state)` continues exactly there. The state names no host, so one saved state
restores every host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fpsa_jax.data.batch import Batch, check_hosts, host_positions, pad_text
from fpsa_jax.data.records import Records


class Loader:
    """Iterates `Batch`es: latents [B, f, h, w, C] and context [B, text_len, E] in the dtypes the
    records store (bfloat16 or float32), context_lengths int32 [B].

    Args:
      records: a records directory (see `fpsa_jax.data.records`) or an open `Records`.
      batch_size: examples per host per step (B).
      text_len: rows of `context`; each embedding is cut to it and zero-padded (512 for Wan).
      seed, shuffle: the per-epoch order.
      process_index, process_count: this host and the number of hosts (jax.process_index(),
        jax.process_count() in a multi-host run).
      num_epochs: stop after this many epochs; None iterates forever.
      state: a `state()` of a loader over the same records with the same seed, shuffle,
        batch_size and process_count.
    """

    def __init__(
        self,
        records: str | Path | Records,
        *,
        batch_size: int,
        text_len: int,
        seed: int = 0,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        num_epochs: int | None = None,
        state: dict[str, Any] | None = None,
    ):
        check_hosts(batch_size, process_index, process_count)
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        if num_epochs is not None and num_epochs < 0:
            raise ValueError(f"num_epochs must be >= 0 or None, got {num_epochs}")
        self.records = records if isinstance(records, Records) else Records(records)
        self.batch_size, self.text_len = batch_size, text_len
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.process_index, self.process_count = process_index, process_count
        n = len(self.records)
        self.steps_per_epoch = n // (batch_size * process_count)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{n} examples are fewer than one global batch (batch_size {batch_size} x "
                f"process_count {process_count})"
            )
        self._epoch, self._step = 0, 0
        self._order_epoch, self._order = -1, np.arange(0)
        if state is not None:
            self._restore(state)

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "source": "records",
            "num_examples": len(self.records),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "process_count": self.process_count,
        }

    def state(self) -> dict[str, Any]:
        """JSON-able position: the next (epoch, step), and what it is only valid for."""
        return {**self._fingerprint(), "epoch": self._epoch, "step": self._step}

    def _restore(self, state: dict[str, Any]) -> None:
        for key, value in self._fingerprint().items():
            if state.get(key) != value:
                raise ValueError(
                    f"state does not belong to this loader: {key} is {state.get(key)!r} in the "
                    f"state, {value!r} here"
                )
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(
                f"state position epoch {epoch}, step {step} is outside 0 <= step < "
                f"{self.steps_per_epoch}"
            )
        self._epoch, self._step = epoch, step

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64 [N]: the example indices in the order epoch `epoch` visits them (all hosts)."""
        n = len(self.records)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(n).astype(np.int64)

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> Batch:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        if self._order_epoch != self._epoch:
            self._order, self._order_epoch = self.epoch_order(self._epoch), self._epoch
        positions = host_positions(
            self._step, self.batch_size, self.process_index, self.process_count
        )
        ids = self._order[positions]
        latents = np.empty((self.batch_size, *self.records.latent_shape), self.records.latent_dtype)
        texts, captions = [], []
        for b, i in enumerate(ids):
            example = self.records[int(i)]
            latents[b] = example.latent
            texts.append(example.text)
            captions.append(example.caption)
        context, lengths = pad_text(texts, self.text_len, self.records.text_dtype)
        self._step += 1
        if self._step == self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        return Batch(latents, context, lengths, tuple(captions), ids)
