"""Records: exact round trip, atomic shard writes, refusals."""

import json

import ml_dtypes
import numpy as np
import pytest

from fpsa_jax.data import Records, RecordWriter
from fpsa_jax.data import records as records_module


def _examples(n, seed=0, shape=(2, 3, 4, 16), dim=8):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.standard_normal(shape).astype(np.float32),
            rng.standard_normal((int(rng.integers(1, 9)), dim)).astype(np.float32),
            f"caption {i} é ✓",
        )
        for i in range(n)
    ]


def write(path, examples, **kw):
    kw.setdefault("shard_size", 3)
    with RecordWriter(path, **kw) as writer:
        for e in examples:
            writer.add(*e)
    return writer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_records_round_trip_exactly(tmp_path, dtype):
    examples = _examples(7)
    write(tmp_path, examples, latent_dtype=dtype, text_dtype=dtype, metadata={"k": [1, 2]})
    records = Records(tmp_path)
    assert len(records) == 7 and records.latent_shape == (2, 3, 4, 16) and records.text_dim == 8
    assert records.index["metadata"] == {"k": [1, 2]}
    assert [s["count"] for s in records.index["shards"]] == [3, 3, 1]
    cast = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    for (latent, text, caption), got in zip(examples, records, strict=True):
        assert got.latent.dtype == np.dtype(cast) and got.caption == caption
        np.testing.assert_array_equal(got.latent, latent.astype(cast))
        np.testing.assert_array_equal(got.text, text.astype(cast))
    assert records[-1].caption == examples[-1][2]
    with pytest.raises(IndexError, match="example 7 out of range"):
        records[7]


def test_failed_shard_write_leaves_no_file(tmp_path, monkeypatch):
    examples = _examples(5)
    writer = RecordWriter(tmp_path, shard_size=3)
    writer.add(*examples[0])
    writer.add(*examples[1])

    def broken(f, arrays):
        f.write(b"partial data")
        raise OSError("disk full")

    monkeypatch.setattr(records_module, "_write_arrays", broken)
    with pytest.raises(OSError, match="disk full"):
        writer.add(*examples[2])
    assert list(tmp_path.iterdir()) == []


def test_an_error_inside_the_writer_leaves_finished_shards_but_no_index(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with RecordWriter(tmp_path, shard_size=2) as writer:
            for e in _examples(3):
                writer.add(*e)
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.rec"]
    with pytest.raises(FileNotFoundError, match="writing did not finish"):
        Records(tmp_path)


def test_an_existing_dataset_is_refused_unless_overwritten(tmp_path):
    write(tmp_path, _examples(4))
    with pytest.raises(FileExistsError, match=r"RecordWriter\(\.\.\., overwrite=True\) replaces"):
        RecordWriter(tmp_path, shard_size=3)
    write(tmp_path, _examples(2, seed=1), overwrite=True, shard_size=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "shard-00000.rec"]
    assert len(Records(tmp_path)) == 2


def test_inconsistent_examples_are_refused(tmp_path):
    writer = RecordWriter(tmp_path, shard_size=3)
    writer.add(*_examples(1)[0])
    latent, text, caption = _examples(1, shape=(2, 3, 5, 16))[0]
    with pytest.raises(ValueError, match="every latent must have shape"):
        writer.add(latent, text, caption)
    latent, text, caption = _examples(1, dim=9)[0]
    with pytest.raises(ValueError, match="every text must be"):
        writer.add(latent, text, caption)
    with pytest.raises(ValueError, match="Lt >= 1"):
        writer.add(latent, text[:0], caption)
    with pytest.raises(ValueError, match="latent must be"):
        writer.add(latent[0], text, caption)
    with pytest.raises(ValueError, match="no examples were added"):
        RecordWriter(tmp_path / "empty", shard_size=1).close()
    with pytest.raises(ValueError, match="shard_size must be >= 1"):
        RecordWriter(tmp_path, shard_size=0)
    with pytest.raises(ValueError, match="unsupported record dtype 'float16'"):
        RecordWriter(tmp_path, shard_size=1, latent_dtype="float16")


def test_foreign_or_damaged_files_are_refused(tmp_path):
    write(tmp_path, _examples(2))
    index = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**index, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        Records(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({**index, "num_examples": 3}))
    with pytest.raises(ValueError, match="do not add up"):
        Records(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps(index))
    (tmp_path / "shard-00000.rec").write_bytes(b"not a shard at all, really")
    with pytest.raises(ValueError, match="bad magic"):
        Records(tmp_path)[0]
