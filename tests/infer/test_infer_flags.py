"""`python -m infer` checks every flag before any work, each error one line naming the flag and
its range, with the short usage (issue 15.7-15.9). All cases of a test run in one process
(tests/app_probe.py), the demo and Wan generation replaced by a stop."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile

from safetensors.numpy import save_file

from infer.video import default_save_file
from tests.app_probe import outcomes, probe
from tests.conftest import subprocess_env
from tests.convert.wan_state import make_original_state_dict
from tests.pipeline.conftest import DIT

WORK = ["infer.__main__._generate_demo", "infer.__main__._generate_wan"]
DEMO = "work: infer.__main__._generate_demo"
WAN = "work: infer.__main__._generate_wan"


def test_bad_values_are_refused_before_any_work_naming_the_flag_and_range(tmp_path):
    """Before: --sample_shift -1 or nan and --sample_guide_scale inf failed with a traceback
    inside sampling (after the model loaded), --base_seed 2^63 with an OverflowError while
    denoising, an empty --prompt silently became the default prompt, and --size named no
    flag."""
    cases = {
        "--sample_shift=-1": "error: --sample_shift must be a finite number > 0, got -1.0",
        "--sample_shift=nan": "error: --sample_shift must be a finite number > 0, got nan",
        "--sample_guide_scale=inf": (
            "error: --sample_guide_scale must be a finite number >= 0, got inf"
        ),
        "--sample_steps=0": "error: --sample_steps must be >= 1, got 0",
        "--base_seed=9223372036854775808": (
            "error: --base_seed must be < 2^63 (a negative seed picks a random one), got "
            "9223372036854775808"
        ),
        "--ulysses_size=0": "error: --ulysses_size must be >= 1, got 0",
        "--prompt=": (
            "error: --prompt is empty; give the video's text, or leave --prompt out for the default"
        ),
        "--prompt= \t": (
            "error: --prompt is empty; give the video's text, or leave --prompt out for the default"
        ),
        "--size=1x1": (
            "error: --size=1x1 --frame_num=9: video size 1*1 (width*height): both must be "
            "positive multiples of 16 (VAE stride 8 x DiT patch 2)"
        ),
        "--sample_shift=3": DEMO,
    }
    assert outcomes("infer.__main__", [[c] for c in cases], work=WORK, cwd=tmp_path) == list(
        cases.values()
    )
    assert list(tmp_path.iterdir()) == []  # no outputs/ folder, nothing else


def test_a_bad_flag_prints_two_lines_and_exits_1_not_the_help(tmp_path):
    """Before: absl printed the module docstring and every flag's help (65 lines) above it."""
    result = subprocess.run(
        [sys.executable, "-m", "infer", "--sample_shift=nan"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "usage: python -m infer [--flag=value ...]; python -m infer --help lists the flags",
        "error: --sample_shift must be a finite number > 0, got nan",
    ]


def test_a_negative_seed_is_a_random_one_printed_and_in_the_file_name(tmp_path):
    """Wan's generate.py: base_seed < 0 draws a seed (default -1 there). Before: -1 was used as
    it is, the noise of seed 2^32 - 1."""
    (first, second) = probe("infer.__main__", [["--base_seed=-1"]] * 2, work=WORK, cwd=tmp_path)
    seeds = []
    for run in (first, second):
        assert run["outcome"] == DEMO
        match = re.search(
            r"--base_seed -1: the random seed (\d+) \(--base_seed=\1 makes", run["stdout"]
        )
        assert match, run["stdout"]
        seeds.append(int(match[1]))
    assert seeds[0] != seeds[1] and all(0 <= s < 2**63 for s in seeds)


def test_default_names_differ_for_every_prompt():
    """Before: the name kept the prompt's first 50 ASCII letters and digits only, so long
    prompts sharing a beginning, or prompts in Chinese (all "video"), shared one file."""
    long = "a red square slides from left to right across a dark background, "
    prompts = [
        long + "slowly",
        long + "quickly",
        "一只猫",
        "一只狗",
        "a red square!",
        "a red square?",
    ]
    names = {default_save_file("t2v-1.3B", "832*480", 0, p) for p in prompts}
    assert len(names) == len(prompts)
    assert default_save_file("t2v-1.3B", "832*480", 0, "一只猫").name.startswith(
        "t2v-1.3B_832x480_0_video_"
    )
    # The same request keeps its name.
    assert default_save_file("default", "32*32", 7, "x") == default_save_file(
        "default", "32*32", 7, "x"
    )


def test_existing_outputs_are_kept_unless_overwrite(tmp_path):
    """Before: every run replaced whatever --save_file (or its default name) held."""
    video, latents = tmp_path / "v.mp4", tmp_path / "z.npy"
    video.write_bytes(b"an earlier video")
    latents.write_bytes(b"earlier latents")
    flags = [f"--save_file={video}", f"--save_latents={latents}"]
    assert outcomes(
        "infer.__main__",
        [
            flags,
            [f"--save_file={tmp_path / 'new.mp4'}", f"--save_latents={latents}"],
            [*flags, "--overwrite"],
        ],
        work=WORK,
        cwd=tmp_path,
    ) == [
        f"error: --save_file {video} exists; pass --overwrite to replace it",
        f"error: --save_latents {latents} exists; pass --overwrite to replace it",
        DEMO,
    ]
    assert video.read_bytes() == b"an earlier video"


def _headers_only_model_dir(root):
    """A Wan2.1 directory (original layout) whose DiT is real (config.json + safetensors) and
    whose other files are empty stand-ins: enough for every check before weights load."""
    root.mkdir()
    save_file(make_original_state_dict(DIT, seed=0), root / "diffusion_pytorch_model.safetensors")
    config = {
        k: DIT[k]
        for k in ("dim", "ffn_dim", "freq_dim", "in_dim", "out_dim", "num_heads", "num_layers")
    }
    (root / "config.json").write_text(json.dumps(config))
    for name in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"):
        zipfile.ZipFile(root / name, "w").close()  # zip format: no torch needed
    (root / "google" / "umt5-xxl").mkdir(parents=True)
    (root / "google" / "umt5-xxl" / "tokenizer.json").write_text("{}")
    return root


def test_ulysses_size_is_checked_against_devices_heads_and_tokens_before_loading(tmp_path):
    """Before: a --ulysses_size that does not divide the heads failed inside the traced model,
    after every weight had loaded."""
    model = _headers_only_model_dir(tmp_path / "model")
    base = [
        f"--ckpt_dir={model}",
        "--size=32*32",
        "--frame_num=5",
        f"--save_file={tmp_path / 'v.mp4'}",
    ]
    heads = DIT["num_heads"]
    assert outcomes(
        "infer.__main__",
        [
            [*base, "--ulysses_size=3"],
            [*base, "--ulysses_size=8"],
            [*base, "--size=48*16", "--frame_num=1", "--ulysses_size=2"],
            [*base, "--ulysses_size=2"],
            ["--ulysses_size=2"],
        ],
        work=WORK,
        cwd=tmp_path,
        devices=4,
    ) == [
        f"error: --ulysses_size 3: seq=3 does not divide the model's {heads} attention heads",
        "error: --ulysses_size 8: data=1 x fsdp=1 x seq=8 needs 8 devices, 4 available",
        "error: --ulysses_size 2: seq=2 does not divide the 3 tokens of a video",
        WAN,
        "error: --ulysses_size > 1 needs --ckpt_dir (the demo model is one device)",
    ]


def test_videos_and_arrays_get_the_permissions_of_new_files(tmp_path):
    """Before: 0600, the mode of the temp file they were written as."""
    import os

    import numpy as np

    from infer.video import save_npy, save_video

    before = os.umask(0o022)
    try:
        save_video(tmp_path / "v.mp4", np.zeros((1, 16, 16, 3)), fps=8)
        save_npy(tmp_path / "z.npy", np.zeros(3))
    finally:
        os.umask(before)
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("v.mp4", "z.npy")] == [0o644] * 2
