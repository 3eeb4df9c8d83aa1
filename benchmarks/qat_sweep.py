"""QAT runs of the demo model side by side, then their accuracy against fine-tuning steps.

    python benchmarks/qat_sweep.py --num_steps 2000 --eval_steps 500 1000 2000 \\
        --variant "demo=demo" --variant "demo-shift12=demo;sigma_shift=12" \\
        --variant "cal35=train/configs/demo-schedule-35.json" --seeds 4 --noise_seed 2000

Each --variant NAME=SCHEDULE[;KEY=VALUE...] is one `python -m train` run from the dense demo
checkpoint with `train/configs/demo-qat.json`, the StepSchedule SCHEDULE (a preset or a JSON
file) and the TrainConfig fields KEY=VALUE on top (`--set`); all runs start at once as separate
processes (the demo model leaves one GPU mostly idle, so they share it). Their EMA weights are
exported at every --eval_steps step (`train.export_demo`) and sampled on the held-out captions at
the noise seeds given (`quality.py`'s rows: dense bf16, each schedule's training-free row, and
"FPSA after QAT" of every run at every step, plus the dense-attention row of each run's last
step). Prints a table of "all four" accuracy against steps and writes every number to --json;
--copy_final copies each run's last export there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DEMO_GRID = (9, 8, 8)  # the demo preset's token grid (fpsa_jax.demo.task)


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """Parses NAME=SCHEDULE;K=V;... into (name, schedule, ["K=V", ...])."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--variant takes NAME=SCHEDULE[;KEY=VALUE...], got {text!r}")
    schedule, *sets = rest.split(";")
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--variant {name}: {item!r} is not KEY=VALUE")
    return name, schedule, sets


def mean_density(schedule, num_steps: int, grid=DEMO_GRID) -> float:
    """Fraction of tile pairs computed, averaged over the sampling steps (dense steps count 1)."""
    configs = [schedule.phases[schedule.phase_index(i, num_steps)].config for i in range(num_steps)]
    return sum(1.0 if c is None else c.density(grid) for c in configs) / num_steps


def check_variant(config: str, schedule: str, sets: list[str]) -> None:
    """Raises (naming the problem) when `python -m train` would refuse the variant's schedule or
    TrainConfig fields, so no run starts before every variant is known to be valid. Values parse
    as train's --set does: JSON, else a bare string."""
    from fpsa_jax.attention import StepSchedule
    from fpsa_jax.training import TrainConfig

    fields = json.loads(Path(ROOT / config).read_text())
    for item in sets:
        key, _, value = item.partition("=")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    path = ROOT / schedule if schedule.endswith(".json") else schedule  # else a preset name
    TrainConfig.from_dict(fields).replace(schedule=StepSchedule.load(path))


def train_command(args, name: str, schedule: str, sets: list[str]) -> list[str]:
    command = [
        sys.executable, "-m", "train",
        "--workdir", str(Path(args.runs_dir) / name),
        "--model", args.dense, "--data", "demo", "--config", args.config,
        "--schedule", schedule,
        "--batch_size", str(args.batch_size), "--num_steps", str(args.num_steps),
        "--save_every", str(min(args.eval_steps)), "--keep", "1000",
        "--log_every", "50", "--remat", "none", "--seed", str(args.seed),
    ]  # fmt: skip
    for item in sets:
        command += ["--set", item]
    return command


def run_all(args, variants) -> dict[str, float]:
    """Starts every run, waits for all; returns each run's wall seconds. Exits on a failure."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1"}
    procs = {}
    for name, schedule, sets in variants:
        log = open(Path(args.runs_dir) / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        command = train_command(args, name, schedule, sets)
        print(" ".join(command), flush=True)
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs[name] = (proc, log, time.perf_counter())
    seconds, failed = {}, []
    for name, (proc, log, start) in procs.items():
        proc.wait()
        log.close()
        seconds[name] = time.perf_counter() - start
        print(f"{name}: rc {proc.returncode} after {seconds[name]:.0f} s", flush=True)
        if proc.returncode:
            failed.append(name)
    for name in failed:
        tail = (Path(args.runs_dir) / f"{name}.log").read_text().splitlines()[-30:]
        print(f"--- {name} (failed) ---\n" + "\n".join(tail), flush=True)
    if failed:
        raise SystemExit(f"runs failed: {failed}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", action="append", required=True, help="NAME=SCHEDULE;K=V")
    parser.add_argument("--num_steps", type=int, default=2000)
    parser.add_argument("--eval_steps", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1, help="training seed (data order, noise)")
    parser.add_argument("--seeds", type=int, default=4, help="noise seeds per held-out caption")
    parser.add_argument("--noise_seed", type=int, default=2000, help="first evaluation seed")
    parser.add_argument("--config", default="train/configs/demo-qat.json")
    parser.add_argument("--dense", default=None, help="start checkpoint (default: the dense demo)")
    parser.add_argument("--runs_dir", default="runs/qat-sweep")
    parser.add_argument("--impl", default="xla", help="attention impl of the evaluation")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--copy_final", default=None, help="copy each run's last export here")
    args = parser.parse_args()
    try:
        variants = [parse_variant(v) for v in args.variant]
    except ValueError as e:
        parser.error(str(e))
    names = [v[0] for v in variants]
    if len(set(names)) != len(names):
        parser.error(f"--variant names repeat: {names}")
    if any(s < 1 or s > args.num_steps for s in args.eval_steps):
        parser.error(f"--eval_steps must lie in [1, --num_steps], got {args.eval_steps}")
    if any(s % min(args.eval_steps) for s in [*args.eval_steps, args.num_steps]):
        parser.error("--eval_steps and --num_steps must be multiples of the smallest eval step")
    from fpsa_jax.demo import DENSE_CHECKPOINT, load_demo

    args.dense = args.dense or str(DENSE_CHECKPOINT)
    if not Path(args.dense).is_file():
        parser.error(f"--dense: no checkpoint file {args.dense}")
    for name, schedule, sets in variants:
        try:
            check_variant(args.config, schedule, sets)
        except (OSError, TypeError, ValueError) as e:
            parser.error(f"--variant {name}: {e}")
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    for name in names:
        if (Path(args.runs_dir) / name).exists():
            parser.error(f"{Path(args.runs_dir) / name} exists; pick another --runs_dir")

    train_seconds = run_all(args, variants)

    from quality import evaluate, held_out_targets, label

    from train.export_demo import export

    exports = {}
    for name in names:
        for step in sorted(args.eval_steps):
            out = Path(args.runs_dir) / f"{name}-step{step}.safetensors"
            export(Path(args.runs_dir) / name, out, step=step, note=f"qat_sweep variant {name}")
            exports[name, step] = load_demo(out)

    targets, noise_seeds = held_out_targets(args.seeds, args.noise_seed)
    dense = load_demo(args.dense)
    rows = []

    def add(name, ckpt, schedule, reference=None, **extra):
        row, videos = evaluate(
            name, ckpt, schedule, targets, noise_seeds, args.impl, "emulated", reference
        )
        rows.append({**row, **extra})
        print(f"{row['variant']}: all four {row['acc_all']:.3f} ({row['seconds']:.1f} s)")
        return videos

    reference = add("dense bf16", dense, None, run=None, step=0)
    seen = []
    for name in names:
        last = exports[name, max(args.eval_steps)]
        if last.schedule not in seen:
            seen.append(last.schedule)
            add(f"training-free FP8 + sparse [{name}]", dense, last.schedule, reference, run=name)
        for step in sorted(args.eval_steps):
            ckpt = exports[name, step]
            density = mean_density(ckpt.schedule, ckpt.sampling.num_steps)
            add(f"FPSA after QAT [{label(ckpt)}]", ckpt, ckpt.schedule, reference, run=name,
                step=step, mean_density=density)  # fmt: skip
        add(f"(QAT model, dense) [{label(last)}]", last, None, reference, run=name)

    print(
        "\n| run | mean density | "
        + " | ".join(f"step {s}" for s in sorted(args.eval_steps))
        + " |"
    )
    print("|---|---|" + "---|" * len(args.eval_steps))
    for name in names:
        mine = [r for r in rows if r.get("run") == name and "step" in r]
        print(
            f"| {name} | {mine[0]['mean_density']:.1%} | "
            + " | ".join(f"{r['acc_all']:.3f}" for r in mine)
            + " |"
        )
    print(f"\nrun wall seconds (all at once): {train_seconds}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "train_seconds": train_seconds, "args": vars(args)}, indent=1)
        )
    if args.copy_final:
        Path(args.copy_final).mkdir(parents=True, exist_ok=True)
        for name in names:
            src = Path(args.runs_dir) / f"{name}-step{max(args.eval_steps)}.safetensors"
            shutil.copy2(src, Path(args.copy_final) / src.name)


if __name__ == "__main__":
    main()
