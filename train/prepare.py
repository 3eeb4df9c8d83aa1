"""`python -m train.prepare`: precompute training records (VAE latents + UMT5 text embeddings).

From a folder of clips with captions beside them (`clip.mp4` + `clip.txt`):

    python -m train.prepare --videos_dir=clips/ --out_dir=data/ --ckpt_dir=Wan2.1-T2V-1.3B

Each clip is resampled to --fps, scaled to cover --size and center-cropped, and its first
--frame_num frames are encoded. Clips without a (non-empty) caption, too short or unreadable are
SKIPPED: each is reported with the reason, listed under metadata.skipped in index.json, and the
run fails only when no clip is usable.

Or from N procedurally rendered clips (moving coloured shapes, see fpsa_jax.data.synthetic):

    python -m train.prepare --synthetic=64 --out_dir=data/ [--ckpt_dir=...]

Without --ckpt_dir (only with --synthetic) a STAND-IN encoding is used instead of Wan's VAE and
UMT5 (pooled pixels and random word vectors; fpsa_jax.data.StandInEncoder): for trying the
training pipeline only.
"""

from __future__ import annotations

import re
import time

from absl import app, flags

from fpsa_jax import cli
from fpsa_jax.ranges import Range

_VIDEOS_DIR = flags.DEFINE_string(
    "videos_dir",
    None,
    "Folder of clips (.mp4, .mov, .mkv, .webm, .avi, searched recursively), each with a caption "
    "file of the same name ending in .txt.",
)
_SYNTHETIC = cli.check_range(
    flags.DEFINE_integer(
        "synthetic", 0, "Instead of --videos_dir, render this many synthetic clips."
    ),
    Range(0, integer=True),
)
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Output records directory (index.json + shard-*.rec).", required=True
)
_CKPT_DIR = flags.DEFINE_string(
    "ckpt_dir",
    None,
    "Wan2.1 text-to-video model directory (original or diffusers layout) whose VAE and UMT5 "
    "encode the clips. May be omitted only with --synthetic: then a stand-in encoding is used.",
)
_SIZE = flags.DEFINE_string(
    "size", "832*480", "Video size WIDTH*HEIGHT in pixels, multiples of 16 (e.g. 832*480)."
)
_FRAME_NUM = flags.DEFINE_integer(
    "frame_num", 81, "Frames per clip, 4k+1; longer clips are cut, shorter ones skipped."
)
_FPS = cli.check_range(
    flags.DEFINE_float(
        "fps",
        16.0,
        "Frame rate clips are resampled to before cutting (Wan2.1: 16); 0 keeps each clip's own "
        "rate.",
    ),
    Range(0),
)
_SHARD_SIZE = cli.check_range(
    flags.DEFINE_integer("shard_size", 64, "Examples per shard file."), Range(1, integer=True)
)
_LATENT_DTYPE = flags.DEFINE_enum(
    "dtype", "bfloat16", ["bfloat16", "float32"], "Storage dtype of latents and text embeddings."
)
_SEED = cli.check_range(
    flags.DEFINE_integer("seed", 0, "Seed of the --synthetic clips."),
    Range(0, 2**63, hi_open=True, integer=True),
)
_STANDIN_TEXT_DIM = cli.check_range(
    flags.DEFINE_integer(
        "standin_text_dim", 4096, "Text embedding width of the stand-in encoding (UMT5-XXL: 4096)."
    ),
    Range(1, integer=True),
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace an existing dataset in --out_dir (its index and shards)."
)


def _parse_size(size: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[*x]\s*(\d+)\s*", size)
    if not match:
        raise app.UsageError(f"--size must look like 832*480 (WIDTH*HEIGHT), got {size!r}")
    return int(match.group(1)), int(match.group(2))


def _check_flags() -> tuple[int, int]:
    from fpsa_jax.pipeline import check_video_request

    width, height = _parse_size(_SIZE.value)
    try:
        check_video_request(width, height, _FRAME_NUM.value)
    except ValueError as e:
        raise app.UsageError(f"--size={_SIZE.value} --frame_num={_FRAME_NUM.value}: {e}") from None
    if bool(_VIDEOS_DIR.value) == bool(_SYNTHETIC.value):
        raise app.UsageError("give exactly one of --videos_dir and --synthetic")
    if not _CKPT_DIR.value and not _SYNTHETIC.value:
        raise app.UsageError(
            "--ckpt_dir is required with --videos_dir (only --synthetic may use the stand-in "
            "encoding)"
        )
    return width, height


def _encoder():
    from fpsa_jax.data import StandInEncoder

    if not _CKPT_DIR.value:
        print(
            "NOTE: no --ckpt_dir: STAND-IN encoding (average-pooled pixels and random word "
            "vectors), not Wan's VAE and UMT5. Only for trying the training pipeline."
        )
        return StandInEncoder(text_dim=_STANDIN_TEXT_DIM.value)
    from fpsa_jax.convert import load_t2v_weights
    from fpsa_jax.data.encoders import WanEncoder

    t0 = time.perf_counter()
    try:
        weights = load_t2v_weights(_CKPT_DIR.value)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(f"--ckpt_dir: {e}") from None
    print(f"loaded VAE and UMT5 from {_CKPT_DIR.value} in {time.perf_counter() - t0:.1f} s")
    return WanEncoder(weights, source=_CKPT_DIR.value)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    width, height = _check_flags()
    frames = _FRAME_NUM.value
    _check_out_dir()  # before the VAE and UMT5 load

    from tqdm import tqdm

    from fpsa_jax.data import RecordWriter, find_clips
    from fpsa_jax.data.prepare import clip_items, encode_to_records, synthetic_items

    if _SYNTHETIC.value:
        total, skipped = _SYNTHETIC.value, []
        items = synthetic_items(total, seed=_SEED.value, frames=frames, height=height, width=width)
        source = f"synthetic (seed {_SEED.value})"
    else:
        try:
            clips, skipped = find_clips(_VIDEOS_DIR.value)
        except FileNotFoundError as e:
            raise app.UsageError(f"--videos_dir: {e}") from None
        total = len(clips) + len(skipped)
        items = clip_items(clips, frames=frames, height=height, width=width, fps=_FPS.value)
        source = _VIDEOS_DIR.value
        if not clips:
            _report_skipped(skipped, total)
            raise app.UsageError(f"no usable clips in {source}")

    encoder = _encoder()
    metadata = {
        "source": source,
        "size": [width, height],
        "frame_num": frames,
        "fps": _FPS.value if not _SYNTHETIC.value else None,
        "encoder": encoder.describe(),
    }
    try:
        writer = RecordWriter(
            _OUT_DIR.value,
            shard_size=_SHARD_SIZE.value,
            latent_dtype=_LATENT_DTYPE.value,
            text_dtype=_LATENT_DTYPE.value,
            metadata=metadata,
            overwrite=_OVERWRITE.value,
        )
    except FileExistsError as e:
        raise app.UsageError(str(e)) from None
    t0 = time.perf_counter()
    with tqdm(total=total - len(skipped), unit="clip", desc="encoding") as bar:
        skipped += encode_to_records(items, encoder, writer, progress=bar.update)
    writer.metadata["skipped"] = [{"path": str(s.path), "reason": s.reason} for s in skipped]
    _report_skipped(skipped, total)
    if writer.num_examples == 0:
        raise app.UsageError(f"no usable clips in {source}; nothing written")
    index = writer.close()
    shape = "x".join(str(d) for d in writer.latent_shape)
    print(
        f"wrote {writer.num_examples} examples ({writer.num_shards} shards, latents {shape} "
        f"{_LATENT_DTYPE.value}, text width {writer.text_dim}) to {index.parent} in "
        f"{time.perf_counter() - t0:.1f} s"
    )


def _check_out_dir() -> None:
    """--out_dir writable, and holding no dataset unless --overwrite (RecordWriter would refuse
    it only after the VAE and UMT5 load)."""
    from pathlib import Path

    from fpsa_jax.data.records import INDEX
    from fpsa_jax.outputs import Output, OutputError, check_outputs

    out_dir = Path(_OUT_DIR.value)
    try:
        check_outputs([Output("--out_dir", out_dir, is_dir=True)])
    except OutputError as e:
        raise SystemExit(f"error: {e}") from None
    if (out_dir / INDEX).exists() and not _OVERWRITE.value:
        raise SystemExit(
            f"error: --out_dir {out_dir} holds a dataset ({INDEX}); pass --overwrite to replace it"
        )


def _report_skipped(skipped, total: int) -> None:
    if not skipped:
        return
    print(f"skipped {len(skipped)} of {total} clips:")
    for s in skipped:
        print(f"  {s.path}: {s.reason}")


if __name__ == "__main__":
    cli.run(main)
