"""`python -m train` checks its flags, the --model's config, the --mesh and the --workdir before
any weights load or the workdir is written, one line each (issue 15.7). All cases run in one
process (tests/app_probe.py) on 4 forced CPU devices, `train.loop.run` replaced by a stop."""

from __future__ import annotations

from tests.app_probe import outcomes

RUN = "work: train.loop.run"


def test_flags_and_the_mesh_are_refused_before_any_work(tmp_path):
    """Before: a --mesh larger than the devices, a batch not divisible by data x fsdp or a seq
    not dividing the heads failed with a ValueError or an XLA traceback after the weights were
    initialised and the workdir written; --seed 2^63 raised an OverflowError, -1 a NumPy
    traceback; a schedule JSON without a phase's config said KeyError('config')."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "no_config.json").write_text('{"phases": [{"end_fraction": 1.0}]}')
    (tmp_path / "a_list.json").write_text("[1, 2]")
    workdir = tmp_path / "run"
    clip = ["--size=32*32", "--frame_num=5"]
    cases = {
        (f"--workdir={tmp_path / 'afile'}",): (
            f"error: --workdir {tmp_path / 'afile'} exists and is not a directory"
        ),
        ("--mesh=8,1,1",): (
            "error: --mesh 8,1,1: data=8 x fsdp=1 x seq=1 needs 8 devices, 4 available"
        ),
        ("--mesh=1,2,1", "--batch_size=1"): (
            "error: --mesh 1,2,1: the batch of 1 is not divisible by data x fsdp = 2 (each "
            "device takes whole samples)"
        ),
        (
            "--mesh=1,1,3",
        ): "error: --mesh 1,1,3: seq=3 does not divide the model's 2 attention heads",
        ("--mesh=1,1,2", "--size=48*16", "--frame_num=1"): (
            "error: --mesh 1,1,2: seq=2 does not divide the 3 tokens of a video"
        ),
        ("--seed=-1",): "error: --seed must be in [0, 2^63), got -1",
        ("--seed=9223372036854775808",): (
            "error: --seed must be in [0, 2^63), got 9223372036854775808"
        ),
        ("--batch_size=0",): "error: --batch_size must be >= 1, got 0",
        (f"--schedule={tmp_path / 'no_config.json'}",): (
            f"error: --schedule {tmp_path / 'no_config.json'}: StepSchedule phases[0] must be an "
            "object with exactly the keys end_fraction and config (null for dense), got keys "
            "['end_fraction']"
        ),
        (f"--schedule={tmp_path / 'a_list.json'}",): (
            f"error: --schedule {tmp_path / 'a_list.json'}: a StepSchedule is "
            '{"phases": [{"end_fraction": ..., "config": ...}, ...]}, got a list'
        ),
        ("--mesh=1,2,2", "--batch_size=2"): RUN,
    }
    argvs = [[f"--workdir={workdir}", *clip, *flags] for flags in cases]
    assert outcomes("train.__main__", argvs, work=["train.loop.run"], cwd=tmp_path, devices=4) == (
        list(cases.values())
    )
    assert not workdir.exists()


def test_the_model_of_a_checkpoint_is_read_without_its_weights(tmp_path):
    """--model as a converted checkpoint: its config.json gives the heads the --mesh must
    divide, before any weight is read (params/ here is empty: reading it would fail)."""
    from fpsa_jax.config import WanConfig

    model = tmp_path / "converted"
    (model / "params").mkdir(parents=True)
    (model / "config.json").write_text(WanConfig.preset("tiny").replace(num_heads=4).to_json())
    base = [f"--workdir={tmp_path / 'run'}", f"--model={model}", "--size=32*32", "--frame_num=5"]
    assert outcomes(
        "train.__main__",
        [[*base, "--mesh=1,1,3"], [*base, "--mesh=1,1,4"]],
        work=["train.loop.run"],
        cwd=tmp_path,
        devices=4,
    ) == ["error: --mesh 1,1,3: seq=3 does not divide the model's 4 attention heads", RUN]


def _workdir_with_steps(workdir, steps):
    """A run directory whose checkpoints/ holds complete (tiny, not restorable as a TrainState)
    orbax checkpoints of `steps`."""
    import numpy as np
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(), item_names=("state", "data", "meta")
    ) as manager:
        for step in steps:
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave({"x": np.zeros(1)}),
                    data=ocp.args.JsonSave({}),
                    meta=ocp.args.JsonSave({}),
                ),
            )
        manager.wait_until_finished()
    return workdir


def test_export_demo_checks_the_step_and_paths_before_building_any_state(tmp_path):
    """Before: --step naming a missing step gave orbax's FileNotFoundError traceback after the
    model and train state were built; a --workdir that is a file a NotADirectoryError traceback;
    a missing --workdir was created (checkpoints/ inside it) on the way to "no checkpoints"."""
    workdir = _workdir_with_steps(tmp_path / "run", [2, 4])
    (tmp_path / "afile").write_text("x")
    out = f"--out={tmp_path / 'demo.safetensors'}"
    cases = {
        (f"--workdir={workdir}", "--step=3", out): (
            f"error: --workdir {workdir} has no checkpoint of step 3 (--step); its steps: 2, 4"
        ),
        (f"--workdir={tmp_path / 'afile'}", out): (
            f"error: --workdir {tmp_path / 'afile'}: not a directory (the --workdir of a "
            "`python -m train` run)"
        ),
        (f"--workdir={tmp_path / 'missing'}", out): (
            f"error: --workdir {tmp_path / 'missing'}: not a directory (the --workdir of a "
            "`python -m train` run)"
        ),
        (f"--workdir={tmp_path}", out): f"error: --workdir {tmp_path}: no checkpoints",
        (f"--workdir={workdir}", "--step=0", out): "error: --step must be >= 1, got 0",
        (f"--workdir={workdir}", f"--out={tmp_path / 'demo.bin'}"): (
            f"error: --out must end in .safetensors, got {tmp_path / 'demo.bin'}"
        ),
        (f"--workdir={workdir}", "--step=2", out): "work: train.export_demo.export",
    }
    assert outcomes(
        "train.export_demo",
        [list(c) for c in cases],
        work=["train.export_demo.export"],
        cwd=tmp_path,
    ) == list(cases.values())
    assert not (tmp_path / "missing").exists() and not (tmp_path / "checkpoints").exists()
