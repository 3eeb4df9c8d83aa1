"""Fixtures of the UMT5 tests: a tiny random transformers UMT5EncoderModel, saved in the
transformers layout (save_pretrained) and in Wan's .pth layout (renamed in `to_wan_keys`), and a
tiny tokenizer trained here (`save_tiny_tokenizer`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Long enough for relative distances beyond max_distance (the last, clamped bucket).
LENGTH = 150
TRUE_LENGTHS = (150, 57, 5)
TINY_HF = dict(
    vocab_size=100,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
)


# The corpus of the tiny tokenizer.
SENTENCES = [
    "a cat sits on the mat",
    "the dog runs in the park",
    "fish & chips on a plate",
    "a red car drives down the road",
    "the cat and the dog play",
]


def save_tiny_tokenizer(path: Path) -> Path:
    """Trains a 60-piece Unigram model on SENTENCES with `tokenizers` and saves it at `path` as a
    transformers T5Tokenizer (pad 0, EOS 1, like google/umt5-xxl); nothing is downloaded."""
    tokenizers = pytest.importorskip("tokenizers")
    model = tokenizers.Tokenizer(tokenizers.models.Unigram())
    model.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    trainer = tokenizers.trainers.UnigramTrainer(
        vocab_size=60,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    model.train_from_iterator(SENTENCES * 3, trainer)
    vocab = [tuple(v) for v in json.loads(model.to_str())["model"]["vocab"]]
    transformers.T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(path)
    return path


def to_wan_keys(state: dict) -> dict:
    """transformers UMT5EncoderModel names -> names of Wan's models_t5_umt5-xxl-enc-bf16.pth."""
    block = {
        "layer.0.layer_norm": "norm1",
        "layer.0.SelfAttention.q": "attn.q",
        "layer.0.SelfAttention.k": "attn.k",
        "layer.0.SelfAttention.v": "attn.v",
        "layer.0.SelfAttention.o": "attn.o",
        "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
        "layer.1.layer_norm": "norm2",
        "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
        "layer.1.DenseReluDense.wi_1": "ffn.fc1",
        "layer.1.DenseReluDense.wo": "ffn.fc2",
    }
    out = {}
    for name, value in state.items():
        if name == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        if name == "shared.weight":
            out["token_embedding.weight"] = value
        elif name == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        else:
            m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)\.weight", name)
            out[f"blocks.{m[1]}.{block[m[2]]}.weight"] = value
    return out


def random_umt5(**overrides):
    """The tiny transformers UMT5EncoderModel (TINY_HF with `overrides`) with every parameter
    random (norm scales around 1)."""
    torch.manual_seed(0)
    config = transformers.UMT5Config(**{**TINY_HF, **overrides}, attn_implementation="eager")
    model = transformers.UMT5EncoderModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif "relative_attention_bias" in name:
                p.copy_(0.5 * noise)
            elif name in ("shared.weight", "encoder.embed_tokens.weight"):
                p.copy_(noise)
            else:
                p.copy_(noise * p.shape[1] ** -0.5)
    return model


@pytest.fixture(scope="session")
def hf_model():
    return random_umt5()


@pytest.fixture(scope="session")
def inputs() -> tuple[np.ndarray, np.ndarray]:
    """ids, mask int32 [3, LENGTH]: prefix masks of different true lengths, pad id 0 after."""
    rng = np.random.default_rng(0)
    ids = rng.integers(2, TINY_HF["vocab_size"], (len(TRUE_LENGTHS), LENGTH)).astype(np.int32)
    mask = (np.arange(LENGTH)[None] < np.array(TRUE_LENGTHS)[:, None]).astype(np.int32)
    return ids * mask, mask


@pytest.fixture(scope="session")
def reference(hf_model, inputs) -> np.ndarray:
    """The transformers encoder's last hidden state, float32 [3, LENGTH, d_model]."""
    ids, mask = inputs
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
        ).last_hidden_state
    return out.numpy()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, hf_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("umt5")
    hf_model.save_pretrained(root / "pipeline" / "text_encoder")
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    torch.save(to_wan_keys(state), root / "models_t5_umt5-xxl-enc-bf16.pth")
    return {
        "hf": root / "pipeline" / "text_encoder",
        "pipeline": root / "pipeline",
        "wan": root / "models_t5_umt5-xxl-enc-bf16.pth",
        "state": state,
    }
