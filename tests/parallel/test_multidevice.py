"""Sharded runs on a (data=2, fsdp=2, seq=2) mesh of 8 forced CPU devices equal one device.

The numbers come from `multidevice_checks.py`, run once in a subprocess (JAX's device count is
fixed at import, and this process has one device).
"""

import pytest

from tests.parallel.forced_devices import run_checks

TOL = 1e-5  # relative, ||sharded - single|| / ||single||, float32


@pytest.fixture(scope="module")
def results():
    return run_checks("tests.parallel.multidevice_checks")


def test_mesh_has_the_three_axes(results):
    assert results["mesh"] == {"data": 2, "fsdp": 2, "seq": 2}


@pytest.mark.parametrize("name", ["dense", "windowed_fp8"])
def test_ulysses_attention_equals_single_device_fpsa_attention(results, name):
    r = results["attention"][name]
    assert r["rel"] <= TOL
    # Inputs and output split over batch (data x fsdp) and tokens (seq) ...
    assert r["in_spec"] == [["data", "fsdp"], "seq", None, None]
    assert r["out_spec"] == r["in_spec"]
    # ... and the compiled program swaps tokens for heads over 'seq': per device [B/4, L/2, .., D]
    # moved in two head chunks (B=4, L=48, N=4, D=8).
    assert r["seq_all_to_all_shapes"] and all(
        s == [1, 24, 2, 8] for s in r["seq_all_to_all_shapes"]
    )


def test_fpsa_attention_inside_ulysses_sees_whole_sequences_and_a_share_of_heads(results):
    # [B/(data*fsdp), L, N/seq, D]: the tile reorder needs every token.
    assert results["attention"]["local_shapes"] == [[1, 48, 2, 8]] * 3


def test_ulysses_takes_the_mesh_from_the_context(results):
    assert results["attention"]["context_mesh_eager_rel"] <= TOL


def test_sharded_wan_forward_equals_single_device(results):
    m = results["model"]
    assert m["forward_rel"] <= TOL and m["forward_scale"] > 0.1  # not a comparison of zeros
    assert m["out_spec"] == [["data", "fsdp"], None, None, None, None]


def test_sharded_wan_gradients_equal_single_device(results):
    m = results["model"]
    assert m["grad_leaves"] > 30
    assert m["grad_rel_max"] <= TOL, m["grad_rel_worst"]
    assert m["grad_out_fsdp_leaves"] > 20  # gradients come back FSDP-sharded like the params


def test_wan_params_are_split_over_fsdp(results):
    split = results["model"]["fsdp_split_params"]
    assert "['blocks']['self_attn']['q']['kernel']" in split
    assert "['blocks']['ffn']['fc1']['kernel']" in split


def test_wan_self_attention_input_is_split_over_seq(results):
    m = results["model"]
    # Tokens arrive split over 'seq' (per device [B/4, L/2, N, D] = [1, 6, 4, 12], sent as two head
    # chunks), and the operator runs on [B/4, L, N/2, D] = [1, 12, 2, 12] (grid (2, 2, 3)).
    moved = m["seq_all_to_all_shapes"]
    assert moved and all(s == [1, 6, 2, 12] for s in moved)
    assert m["local_shapes"] and all(s == [1, 12, 2, 12] for s in m["local_shapes"])
