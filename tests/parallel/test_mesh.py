"""`make_mesh`: axis names, the -1 wildcard and its errors (this process has one CPU device)."""

import jax
import pytest
from jax.sharding import AxisType

from fpsa_jax.parallel import make_mesh


def test_default_mesh_uses_every_device_on_named_auto_axes():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "seq")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "seq": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert list(mesh.devices.flat) == jax.devices()


def test_minus_one_takes_the_remaining_devices():
    assert dict(make_mesh(fsdp=-1).shape) == {"data": 1, "fsdp": 1, "seq": 1}


@pytest.mark.parametrize(
    "sizes, match",
    [
        ({"data": 2}, "2 devices, but 1 devices are available"),
        ({"fsdp": 2, "seq": -1}, "not divisible by the fixed mesh axes"),
        ({"data": -1, "seq": -1}, "only one mesh axis may be -1"),
        ({"seq": 0}, "'seq' must be a positive int or -1"),
        ({"data": 1.5}, "'data' must be a positive int or -1"),
    ],
)
def test_bad_sizes_raise_naming_the_problem(sizes, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(**sizes)


def test_explicit_device_list_must_match_the_product():
    with pytest.raises(ValueError, match="but 2 devices are available"):
        make_mesh(data=1, devices=jax.devices() * 2)
