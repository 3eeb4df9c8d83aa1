"""The batch every training source yields, and the padding of text embeddings to a fixed length.

Shapes: B batch, f/h/w latent frames/height/width, C latent channels (16), L text rows
(`text_len`, 512 for Wan), E text width (4096 for UMT5-XXL), Lt one caption's true length.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Batch:
    """One host's batch, NumPy arrays ready for `jax.device_put`.

    latents: [B, f, h, w, C] clean (normalised) video latents.
    context: [B, L, E] text embeddings, each cut to its true length and zero beyond it, as Wan's
      DiT consumes them.
    context_lengths: int32 [B], the true length of each row of `context` (after the cut to L).
    captions: B strings.
    example_ids: int64 [B], the examples' global indices in their source (for debugging and
      tests).
    condition: None, or [B, f, h, w, C'] channels the model sees beside the noisy latents and
      that are never noised (WanModel's `condition`, e.g. the demo's position channels).
    """

    latents: np.ndarray
    context: np.ndarray
    context_lengths: np.ndarray
    captions: tuple[str, ...]
    example_ids: np.ndarray
    condition: np.ndarray | None = None


def pad_text(texts: list[np.ndarray], text_len: int, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """B embeddings [Lt_b, E] -> ([B, text_len, E] zero-padded, each cut at text_len; int32 [B]
    lengths after the cut)."""
    if text_len < 1:
        raise ValueError(f"text_len must be >= 1, got {text_len}")
    if not texts:
        raise ValueError("pad_text needs at least one embedding")
    dim = texts[0].shape[-1]
    dtype = texts[0].dtype if dtype is None else dtype
    out = np.zeros((len(texts), text_len, dim), dtype)
    lengths = np.zeros(len(texts), np.int32)
    for i, t in enumerate(texts):
        if t.ndim != 2 or t.shape[1] != dim:
            raise ValueError(f"text embedding {i} must be [Lt, {dim}], got shape {t.shape}")
        n = min(t.shape[0], text_len)
        out[i, :n] = t[:n]
        lengths[i] = n
    return out, lengths


def check_hosts(batch_size: int, process_index: int, process_count: int) -> None:
    """Raises ValueError naming the argument when a batch size or host split is impossible."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count = {process_count}), got {process_index}"
        )


def host_positions(
    step: int, batch_size: int, process_index: int, process_count: int
) -> np.ndarray:
    """Positions (in an epoch's order) of host `process_index`'s examples at global step `step`:
    the global batch of process_count * batch_size consecutive positions, split in contiguous
    blocks of batch_size, host 0 first."""
    start = (step * process_count + process_index) * batch_size
    return np.arange(start, start + batch_size, dtype=np.int64)


class StepSource:
    """Base of the endless generated sources: a position is one global step, split over hosts
    by `host_positions`, and a saved state only restores into the same stream.

    Subclasses call `_start` from their constructor and define `_fingerprint()` (the JSON-able
    identity a state must match) and `_example(i)` -> (latent [f, h, w, C], text embedding
    [Lt, E], caption) for the i-th example of the stream, or `_examples(ids)` -> (latents
    [B, f, h, w, C], B text embeddings, B captions) to draw a batch at once; `_condition(b)` gives
    the batch's `condition` (default None).
    """

    def _start(self, batch_size, text_len, seed, process_index, process_count, state) -> None:
        check_hosts(batch_size, process_index, process_count)
        self.batch_size, self.text_len, self.seed = batch_size, text_len, seed
        self.process_index, self.process_count = process_index, process_count
        self._step = 0
        if state is not None:
            self._restore(state)

    def _fingerprint(self) -> dict:
        raise NotImplementedError

    def _example(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        raise NotImplementedError

    def _examples(self, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
        latents, texts, captions = zip(*(self._example(int(i)) for i in ids), strict=True)
        return np.stack(latents), list(texts), list(captions)

    def _condition(self, batch_size: int) -> np.ndarray | None:
        return None

    def state(self) -> dict:
        """JSON-able position: the next global step, and what it is only valid for."""
        return {**self._fingerprint(), "step": self._step}

    def _restore(self, state: dict) -> None:
        for key, value in self._fingerprint().items():
            if state.get(key) != value:
                raise ValueError(
                    f"state does not belong to this source: {key} is {state.get(key)!r} in the "
                    f"state, {value!r} here"
                )
        self._step = int(state["step"])

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        ids = host_positions(self._step, self.batch_size, self.process_index, self.process_count)
        latents, texts, captions = self._examples(ids)
        context, lengths = pad_text(texts, self.text_len)
        self._step += 1
        condition = self._condition(len(ids))
        return Batch(latents, context, lengths, tuple(captions), ids, condition)
