"""FP8 block linears under a (data=2, fsdp=2, seq=2) mesh of 8 forced CPU devices: the FP8
kernels shard like the float ones and the sharded forward equals one device.

The numbers come from `multidevice_fp8.py`, run once in a subprocess (JAX fixes its device count
at import).
"""

import pytest

from tests.parallel.forced_devices import run_checks

# Sharding moves whole rows and weights; the per-token and per-channel absmax reductions are
# exact, so only float32 summation order can differ (as for the float model, test_multidevice).
TOL = 1e-5


@pytest.fixture(scope="module")
def results():
    return run_checks("tests.parallel.multidevice_fp8")


def test_fp8_kernels_shard_like_the_float_ones(results):
    linears, float_specs = results["linears"], results["float_specs"]
    kernels = [k for k in linears if k.endswith("['kernel']")]
    assert len(kernels) == 10  # q, k, v, o twice and the FFN's two
    for name in kernels:
        assert linears[name]["dtype"] == "float8_e4m3fn"
        assert linears[name]["spec"] == float_specs[name]
    # [layers, dim, dim] split over fsdp on its 'embed' axis: per device [2, 24, 48].
    q = "['self_attn']['q']['kernel']"
    assert linears[q]["spec"] == [None, "fsdp", None] and linears[q]["local_shape"] == [2, 24, 48]
    o_scale = linears["['self_attn']['o']['kernel_scale']"]
    assert o_scale["dtype"] == "float32" and o_scale["spec"] == [None, "fsdp"]


def test_sharded_fp8_forward_equals_single_device(results):
    assert results["forward_rel"] <= TOL and results["forward_scale"] > 0.1
