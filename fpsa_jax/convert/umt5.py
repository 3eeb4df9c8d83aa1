"""`load_umt5`: a UMT5 encoder checkpoint -> (UMT5Config, Flax params of `UMT5Encoder`).

Two key layouts, detected from the names:
- "wan": Wan2.1's `models_t5_umt5-xxl-enc-bf16.pth` (`token_embedding.weight`,
  `blocks.N.attn.q.weight`, `blocks.N.pos_embedding.embedding.weight`, `blocks.N.ffn.gate.0`...);
- "hf": transformers' `UMT5EncoderModel` (`shared.weight`, `encoder.block.N.layer.0.
  SelfAttention.q.weight`, ...), e.g. the `text_encoder/` folder of a diffusers Wan pipeline.
HF names are renamed to Wan names; the config is inferred from tensor shapes and cross-checked
against a transformers `config.json` beside the weights; every key and shape is validated before
the tensors are converted one by one (stacked over layers), so memory holds one leaf at a time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.convert.errors import CheckpointError, CheckpointNotFoundError, format_keys
from fpsa_jax.convert.safetensors_io import SafetensorsReader
from fpsa_jax.convert.sources import TensorReader, read_config_json
from fpsa_jax.convert.torch_io import TorchReader
from fpsa_jax.convert.tree import dtype_name, require_shapes, set_path, stack_layers
from fpsa_jax.model.umt5 import UMT5Config

# Wan name relative to `blocks.N.` -> (path under params["blocks"], transpose?).
_BLOCK_KEYS: dict[str, tuple[tuple[str, ...], bool]] = {
    "norm1.weight": (("norm1", "scale"), False),
    "attn.q.weight": (("attn", "q", "kernel"), True),
    "attn.k.weight": (("attn", "k", "kernel"), True),
    "attn.v.weight": (("attn", "v", "kernel"), True),
    "attn.o.weight": (("attn", "o", "kernel"), True),
    "pos_embedding.embedding.weight": (("pos_embedding",), False),
    "norm2.weight": (("norm2", "scale"), False),
    "ffn.gate.0.weight": (("ffn", "gate", "kernel"), True),
    "ffn.fc1.weight": (("ffn", "fc1", "kernel"), True),
    "ffn.fc2.weight": (("ffn", "fc2", "kernel"), True),
}
_TOP_KEYS: dict[str, tuple[str, ...]] = {
    "token_embedding.weight": ("token_embedding", "embedding"),
    "norm.weight": ("norm", "scale"),
}
# transformers name (after `encoder.block.N.`) -> Wan name (after `blocks.N.`).
_HF_BLOCK = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}
_HF_TOP = {
    "shared.weight": "token_embedding.weight",
    "encoder.embed_tokens.weight": "token_embedding.weight",
    "encoder.final_layer_norm.weight": "norm.weight",
}
# transformers config.json field -> UMT5Config field.
_HF_JSON = {
    "vocab_size": "vocab_size",
    "d_model": "d_model",
    "d_kv": "d_kv",
    "d_ff": "d_ff",
    "num_heads": "num_heads",
    "num_layers": "num_layers",
    "relative_attention_num_buckets": "relative_attention_num_buckets",
    "relative_attention_max_distance": "relative_attention_max_distance",
    "layer_norm_epsilon": "eps",
}
_GATED_GELU = ("gated-gelu", "gated-gelu_new", "gated-gelu_pytorch_tanh")


def load_umt5(path: str | Path, dtype: Any = jnp.bfloat16) -> tuple[UMT5Config, dict[str, Any]]:
    """Loads a UMT5 encoder as (UMT5Config, params of `fpsa_jax.model.umt5.UMT5Encoder`).

    Args:
      path: Wan's `.pth`, a `.safetensors` file or `*.safetensors.index.json`, or
        a directory: a transformers `UMT5EncoderModel` folder, a diffusers pipeline root (its
        `text_encoder/` is read) or a Wan2.1 model folder (its `models_t5*.pth` is read).
      dtype: dtype of the returned parameters (bfloat16, float32 or float16); it also becomes the
        config's `param_dtype`.

    Raises:
      CheckpointError: the message names the offending files, keys or shapes. Missing paths raise
        its FileNotFoundError subclass.
    """
    target = dtype_name(dtype)
    reader, config_json, what = _open(Path(path).expanduser())
    with reader:
        wan_to_file, unexpected = _wan_names(set(reader), what)
        shapes = {k: tuple(reader.shape(f)) for k, f in wan_to_file.items()}
        config = infer_config(shapes, config_json, param_dtype=target)
        _validate(config, wan_to_file, unexpected, shapes)
        params = _convert(reader, wan_to_file, config, np.dtype(target))
    return config, params


def _open(path: Path) -> tuple[TensorReader, dict[str, Any] | None, str]:
    """(reader, config.json beside the weights or None, description of what was read)."""
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint path does not exist: {path}")
    if path.is_dir():
        path = _weights_in_directory(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        reader, what = SafetensorsReader.from_files(files), f"{len(files)} safetensors in {path}"
    elif path.name.endswith(".safetensors.index.json"):
        reader, what = SafetensorsReader.from_index(path), f"safetensors index {path}"
    elif path.name.endswith(".safetensors"):
        reader, what = SafetensorsReader.from_files([path]), f"safetensors file {path}"
    elif path.name.endswith((".pth", ".pt")):
        reader, what = TorchReader(path), f"torch file {path}"
    else:
        raise CheckpointError(
            f"{path}: expected a .pth/.pt, .safetensors or "
            ".safetensors.index.json file, or a model directory"
        )
    folder = path if path.is_dir() else path.parent
    return reader, read_config_json(folder / "config.json"), what


def _weights_in_directory(folder: Path) -> Path:
    if (folder / "text_encoder").is_dir():  # diffusers pipeline root
        return _weights_in_directory(folder / "text_encoder")
    # A Wan2.1 model folder: its safetensors are the DiT, the encoder is models_t5*.pth.
    wan = sorted(folder.glob("models_t5*.pth"))
    if len(wan) == 1:
        return wan[0]
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    if indexes:
        raise CheckpointError(
            f"{folder} holds several safetensors indexes "
            f"({[p.name for p in indexes]}); pass the one to convert"
        )
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files[0] if len(files) == 1 else folder
    raise CheckpointError(
        f"no UMT5 weights found in {folder} (expected *.safetensors, an index, "
        "a text_encoder/ folder or one models_t5*.pth file)"
    )


def _wan_names(names: set[str], what: str) -> tuple[dict[str, str], list[str]]:
    """({Wan name: name in the file}, file names that map to nothing)."""
    is_hf = any(n in _HF_TOP or n.startswith("encoder.") for n in names)
    is_wan = any(n in _TOP_KEYS or n.startswith("blocks.") for n in names)
    if is_hf and is_wan:
        raise CheckpointError(
            f"{what} mixes Wan keys ('blocks.N...') and transformers keys "
            "('encoder.block.N...'); convert one layout at a time"
        )
    if not (is_hf or is_wan):
        raise CheckpointError(
            f"{what} does not look like a UMT5 encoder: none of its "
            f"{len(names)} keys is a Wan or transformers UMT5 key "
            f"({format_keys(names)})"
        )
    if is_wan:
        return {n: n for n in names}, []
    mapping, unexpected = {}, []
    # `shared.weight` and its tied copy `encoder.embed_tokens.weight`: read the first present.
    for n in sorted(names, key=lambda n: n != "shared.weight"):
        m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", n)
        wan = _HF_TOP.get(n) or (m and m[2] in _HF_BLOCK and f"blocks.{m[1]}.{_HF_BLOCK[m[2]]}")
        if not wan:
            unexpected.append(n)
        elif wan not in mapping:
            mapping[wan] = n
    return mapping, unexpected


def infer_config(
    shapes: dict[str, tuple[int, ...]], config_json: dict[str, Any] | None, *, param_dtype: str
) -> UMT5Config:
    """UMT5Config from Wan-name tensor shapes, cross-checked against a transformers config.json.

    Without one, max distance 128 and eps 1e-6 (what Wan hard-codes) are assumed.
    """
    needed = {
        "token_embedding.weight": 2,
        "blocks.0.attn.q.weight": 2,
        "blocks.0.pos_embedding.embedding.weight": 2,
        "blocks.0.ffn.fc1.weight": 2,
    }
    require_shapes(shapes, needed, "Wan names")
    vocab, d_model = shapes["token_embedding.weight"]
    buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    inner = shapes["blocks.0.attn.q.weight"][0]
    if inner % heads:
        raise CheckpointError(
            f"key 'blocks.0.attn.q.weight': {inner} rows is not a multiple of "
            f"the {heads} heads of the position bias"
        )
    inferred = dict(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        num_heads=heads,
        d_ff=shapes["blocks.0.ffn.fc1.weight"][0],
        relative_attention_num_buckets=buckets,
        num_layers=1 + max(int(m[1]) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))),
    )
    extra = {}
    if config_json and "d_model" in config_json:  # a transformers (U)MT5 config
        act = config_json.get("feed_forward_proj", "gated-gelu")
        if act not in _GATED_GELU:
            raise CheckpointError(
                f"config.json has feed_forward_proj={act!r}; only gated GELU "
                f"(tanh) encoders are supported ({_GATED_GELU})"
            )
        declared = {
            ours: config_json[theirs]
            for theirs, ours in _HF_JSON.items()
            if config_json.get(theirs) is not None
        }
        mismatches = [
            f"{f}: config.json says {declared[f]!r}, the weights say {v!r}"
            for f, v in inferred.items()
            if f in declared and declared[f] != v
        ]
        if mismatches:
            raise CheckpointError(
                "config.json disagrees with the tensor shapes: " + "; ".join(mismatches)
            )
        extra = {
            f: declared[f] for f in ("relative_attention_max_distance", "eps") if f in declared
        }
    try:
        return UMT5Config(**inferred, **extra, dtype="bfloat16", param_dtype=param_dtype)
    except ValueError as e:
        raise CheckpointError(f"the inferred config is invalid: {e}") from e


def expected_shapes(config: UMT5Config) -> dict[str, tuple[int, ...]]:
    """Every Wan-name key of an encoder with `config` and its torch shape."""
    e, i, f = config.d_model, config.inner_dim, config.d_ff
    block = {
        "norm1.weight": (e,),
        "attn.q.weight": (i, e),
        "attn.k.weight": (i, e),
        "attn.v.weight": (i, e),
        "attn.o.weight": (e, i),
        "pos_embedding.embedding.weight": (config.relative_attention_num_buckets, config.num_heads),
        "norm2.weight": (e,),
        "ffn.gate.0.weight": (f, e),
        "ffn.fc1.weight": (f, e),
        "ffn.fc2.weight": (e, f),
    }
    shapes = {"token_embedding.weight": (config.vocab_size, e), "norm.weight": (e,)}
    for n in range(config.num_layers):
        shapes.update({f"blocks.{n}.{k}": s for k, s in block.items()})
    return shapes


def _validate(
    config: UMT5Config,
    wan_to_file: dict[str, str],
    unexpected: list[str],
    shapes: dict[str, tuple[int, ...]],
) -> None:
    expected = expected_shapes(config)
    problems = []
    missing = expected.keys() - wan_to_file.keys()
    if missing:
        hint = ""
        if all(k.endswith("pos_embedding.embedding.weight") for k in missing):
            hint = " (a T5 checkpoint? T5 shares block 0's position bias, UMT5 has one per layer)"
        problems.append(f"missing keys ({len(missing)}, Wan names): {format_keys(missing)}{hint}")
    unexpected = unexpected + [f for k, f in wan_to_file.items() if k not in expected]
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {format_keys(unexpected)}")
    wrong = sorted(
        (wan_to_file[k], s, shapes[k])
        for k, s in expected.items()
        if k in shapes and shapes[k] != s
    )
    if wrong:
        listed = ", ".join(f"{n!r} expected {s} found {got}" for n, s, got in wrong[:10])
        more = f" and {len(wrong) - 10} more" if len(wrong) > 10 else ""
        problems.append(f"wrong shapes ({len(wrong)}): {listed}{more}")
    if problems:
        c = config
        raise CheckpointError(
            f"checkpoint does not match the inferred config (d_model={c.d_model}, "
            f"num_heads={c.num_heads}, d_kv={c.d_kv}, d_ff={c.d_ff}, num_layers={c.num_layers}): "
            + "; ".join(problems)
        )


def _convert(
    reader: TensorReader, wan_to_file: dict[str, str], config: UMT5Config, dtype: np.dtype
) -> dict[str, Any]:
    """Builds the tree leaf by leaf; each stacked `blocks` leaf is allocated once in `dtype`
    and filled layer by layer."""
    params: dict[str, Any] = {}
    for key, path in _TOP_KEYS.items():
        set_path(
            params, path, jax.device_put(np.asarray(reader.read(wan_to_file[key])).astype(dtype))
        )
    for rel, (path, transpose) in _BLOCK_KEYS.items():

        def read(n, rel=rel, transpose=transpose):
            layer = reader.read(wan_to_file[f"blocks.{n}.{rel}"])
            return layer.T if transpose else layer

        set_path(params, ("blocks", *path), stack_layers(read, config.num_layers, dtype))
    return params
