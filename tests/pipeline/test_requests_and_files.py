"""Video requests the pipeline refuses, and locating the files of a Wan2.1 model directory."""

from __future__ import annotations

import dataclasses

import pytest

from fpsa_jax.attention import StepSchedule
from fpsa_jax.convert import ModelFiles, find_model_files, with_fp8_linears
from fpsa_jax.pipeline import T2VRequest, check_video_request, latent_shape, text_to_video

SIZE = r"video size {}\*{} \(width\*height\): both must be positive multiples of 16"
FRAMES = r"frame count must be 4k\+1 .*; got {}$"


@pytest.mark.parametrize(
    "width, height, frames, message",
    [
        (840, 480, 81, SIZE.format(840, 480)),
        (832, 472, 81, SIZE.format(832, 472)),
        (0, 480, 81, SIZE.format(0, 480)),
        (832, 480, 80, FRAMES.format(80)),
        (832, 480, 0, FRAMES.format(0)),
    ],
)
def test_bad_video_request_is_refused_naming_the_problem(width, height, frames, message):
    with pytest.raises(ValueError, match=message):
        check_video_request(width, height, frames)
    with pytest.raises(ValueError, match=message):
        latent_shape(1, width, height, frames)


@pytest.mark.parametrize(
    "batch, width, height, frames, shape",
    [(1, 832, 480, 81, (1, 21, 60, 104, 16)), (2, 48, 32, 1, (2, 1, 4, 6, 16))],
)
def test_latent_shape_of_a_valid_request(batch, width, height, frames, shape):
    check_video_request(width, height, frames)
    assert latent_shape(batch, width, height, frames) == shape


def _touch(root, *names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_bytes(b"")


ORIGINAL = (
    "config.json",
    "diffusion_pytorch_model-00001-of-00002.safetensors",
    "Wan2.1_VAE.pth",
    "models_t5_umt5-xxl-enc-bf16.pth",
    "google/umt5-xxl/",
)
DIFFUSERS = ("model_index.json", "transformer/", "vae/", "text_encoder/", "tokenizer/")


def test_finds_the_parts_of_an_original_directory(tmp_path):
    _touch(tmp_path, *ORIGINAL)
    assert find_model_files(tmp_path) == ModelFiles(
        layout="original",
        dit=tmp_path,
        vae=tmp_path / "Wan2.1_VAE.pth",
        text_encoder=tmp_path / "models_t5_umt5-xxl-enc-bf16.pth",
        tokenizer=tmp_path / "google" / "umt5-xxl",
    )


def test_finds_the_parts_of_a_diffusers_directory(tmp_path):
    _touch(tmp_path, *DIFFUSERS)
    assert find_model_files(str(tmp_path)) == ModelFiles(
        layout="diffusers",
        dit=tmp_path / "transformer",
        vae=tmp_path / "vae",
        text_encoder=tmp_path / "text_encoder",
        tokenizer=tmp_path / "tokenizer",
    )


def test_missing_model_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found: .*nowhere"):
        find_model_files(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "layout, leave_out, named",
    [
        ("original", "Wan2.1_VAE.pth", "Wan2.1_VAE.pth"),
        (
            "original",
            "diffusion_pytorch_model-00001-of-00002.safetensors",
            "diffusion_pytorch_model*.safetensors",
        ),
        ("diffusers", "vae/", "vae"),
        ("diffusers", "tokenizer/", "tokenizer"),
    ],
)
def test_incomplete_model_directory_names_the_missing_part(tmp_path, layout, leave_out, named):
    _touch(
        tmp_path, *(n for n in (ORIGINAL if layout == "original" else DIFFUSERS) if n != leave_out)
    )
    with pytest.raises(FileNotFoundError) as err:
        find_model_files(tmp_path)
    message = str(err.value)
    assert f"({layout} layout)" in message
    assert message.endswith(f"missing: {tmp_path / named}")


def test_unknown_schedule_preset_names_the_valid_ones():
    with pytest.raises(
        ValueError,
        match="unknown StepSchedule preset 'nope'; valid: dense, demo, wan-480p, wan-720p",
    ):
        StepSchedule.preset("nope")


def test_a_request_of_an_impossible_size_is_refused_when_made():
    with pytest.raises(ValueError, match="multiples of 16"):
        T2VRequest("a cat", width=60, height=32)
    with pytest.raises(ValueError, match="frame count must be 4k\\+1"):
        T2VRequest("a cat", frames=8)
    with pytest.raises(ValueError, match="T2VRequest.linear_quant must be one of"):
        T2VRequest("a cat", linear_quant="int8")


def test_text_to_video_checks_the_impl_before_encoding_any_prompt(tiny_model):
    # These weights have no text encoder: encoding would raise "no text encoder" first.
    request = T2VRequest("a cat", width=48, height=32, frames=9, num_steps=1)
    with pytest.raises(ValueError, match="unknown impl 'nonsense'; valid: auto"):
        text_to_video(tiny_model.weights, request, attention_impl="nonsense")
    with pytest.raises(ValueError, match="no text encoder"):
        text_to_video(tiny_model.weights, request, attention_impl="xla")


def test_text_to_video_checks_the_fp8_linears_before_encoding_any_prompt(tiny_model):
    request = T2VRequest("a cat", width=48, height=32, frames=9, num_steps=1, linear_quant="fp8")
    with pytest.raises(ValueError, match="FP8 tensor cores .* the backend is cpu"):
        text_to_video(tiny_model.weights, request, attention_impl="xla")
    with pytest.raises(ValueError, match="unknown FP8 linear impl 'fast'"):
        text_to_video(tiny_model.weights, request, attention_impl="xla", linear_impl="fast")
    with pytest.raises(ValueError, match="no text encoder"):  # quantized, model function built
        text_to_video(tiny_model.weights, request, attention_impl="xla", linear_impl="emulated")
    # FP8 weights are not run as float linears.
    fp8 = with_fp8_linears(tiny_model.weights)
    float_request = dataclasses.replace(request, linear_quant="none")
    with pytest.raises(ValueError, match="hold FP8 block linears .* linear_quant='none'"):
        text_to_video(fp8, float_request, attention_impl="xla")
