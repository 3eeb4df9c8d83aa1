"""Loader: fixed shapes, per-epoch permutations, disjoint hosts, exact resume."""

import json

import numpy as np
import pytest

from fpsa_jax.data import Loader, Records
from tests.data.test_records import _examples, write

N = 24


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("records")
    write(path, _examples(N), shard_size=5, latent_dtype="float32", text_dtype="float32")
    return Records(path)


def test_batches_have_fixed_shapes_and_zero_padded_context(records):
    loader = Loader(records, batch_size=4, text_len=6, num_epochs=1)
    batches = list(loader)
    assert len(batches) == N // 4
    for b in batches:
        assert b.latents.shape == (4, 2, 3, 4, 16) and b.context.shape == (4, 6, 8)
        for i, example_id in enumerate(b.example_ids):
            example = records[int(example_id)]
            n = min(example.text.shape[0], 6)
            assert b.context_lengths[i] == n and b.captions[i] == example.caption
            np.testing.assert_array_equal(b.context[i, :n], example.text[:n])
            assert (b.context[i, n:] == 0).all()
            np.testing.assert_array_equal(b.latents[i], example.latent)


def test_shuffling_is_a_new_permutation_each_epoch(records):
    loader = Loader(records, batch_size=4, text_len=8, seed=1, num_epochs=3)
    ids = np.concatenate([b.example_ids for b in loader]).reshape(3, N)
    for epoch in ids:
        assert sorted(epoch) == list(range(N))
    assert not np.array_equal(ids[0], ids[1]) and not np.array_equal(ids[1], ids[2])
    again = np.concatenate(
        [b.example_ids for b in Loader(records, batch_size=4, text_len=8, seed=1, num_epochs=3)]
    )
    np.testing.assert_array_equal(again, ids.reshape(-1))
    plain = Loader(records, batch_size=4, text_len=8, shuffle=False, num_epochs=1)
    np.testing.assert_array_equal(np.concatenate([b.example_ids for b in plain]), np.arange(N))


@pytest.mark.parametrize("hosts,batch", [(2, 3), (3, 4), (4, 1)])
def test_hosts_see_disjoint_subsets_covering_the_epoch(records, hosts, batch):
    seen = [
        np.concatenate(
            [
                b.example_ids
                for b in Loader(
                    records,
                    batch_size=batch,
                    text_len=8,
                    process_index=p,
                    process_count=hosts,
                    num_epochs=1,
                )
            ]
        )
        for p in range(hosts)
    ]
    assert len({len(s) for s in seen}) == 1  # every host takes the same number of steps
    union = np.concatenate(seen)
    assert len(set(union)) == len(union) == N // (hosts * batch) * hosts * batch
    if N % (hosts * batch) == 0:
        assert set(union) == set(range(N))


@pytest.mark.parametrize("consumed", [1, 4, 5, 9])
def test_resume_from_a_saved_state_continues_identically(records, consumed):
    kw = dict(batch_size=5, text_len=8, seed=3, process_index=1, process_count=2)
    reference = Loader(records, **kw)
    expected = [next(reference) for _ in range(consumed + 4)][consumed:]
    interrupted = Loader(records, **kw)
    for _ in range(consumed):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.state()))
    resumed = Loader(records, **kw, state=state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got.example_ids, want.example_ids)
        np.testing.assert_array_equal(got.latents, want.latents)
        np.testing.assert_array_equal(got.context, want.context)
        assert got.captions == want.captions


def test_bad_arguments_and_foreign_states_are_refused(records):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Loader(records, batch_size=13, text_len=8, process_count=2)
    with pytest.raises(ValueError, match="process_index must be in"):
        Loader(records, batch_size=1, text_len=8, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Loader(records, batch_size=0, text_len=8)
    with pytest.raises(ValueError, match="text_len must be >= 1"):
        Loader(records, batch_size=1, text_len=0)
    with pytest.raises(ValueError, match="num_epochs must be"):
        Loader(records, batch_size=1, text_len=8, num_epochs=-1)
    state = Loader(records, batch_size=4, text_len=8).state()
    with pytest.raises(ValueError, match="batch_size is 4 in the state, 2 here"):
        Loader(records, batch_size=2, text_len=8, state=state)
    with pytest.raises(ValueError, match="outside 0 <= step < 6"):
        Loader(records, batch_size=4, text_len=8, state={**state, "step": 6})


def test_loader_opens_a_directory(records):
    batch = next(Loader(records.path, batch_size=2, text_len=8))
    assert batch.latents.dtype == np.float32 and batch.context_lengths.dtype == np.int32
