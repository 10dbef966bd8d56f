"""The training engine on a toy MLP: config validation, freezing, the loop, exact resume, 2 CPU ranks, export."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from blip3o.config.io import dumps_yaml, from_dict, load_yaml, to_dict
from blip3o.config.schema import ConfigError
from blip3o.config.train import OptimConfig, TrainConfig
from blip3o.train import (
    build_optimizer,
    cleanup,
    export_model,
    init_distributed,
    iter_metrics,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    lr_at,
    make_mesh,
    micro_batch_slice,
    set_trainable,
    shard_model,
    train,
    trainable_parameters,
)
from blip3o.train.checkpoint import capture_rng, restore_rng

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import CRASH_AT, Crash, ToyMLP, ToyTask, resume_config

WORKER = Path(__file__).parent / "dist_worker.py"


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {record["step"]: record[key] for record in iter_metrics(run_dir)}


def initial_state(cfg: TrainConfig, task: ToyTask) -> dict[str, torch.Tensor]:
    torch.manual_seed(cfg.seed)  # what the trainer does before build_model
    return {key: value.clone() for key, value in task.build_model().state_dict().items()}


# ---------------------------------------------------------------- config


def test_train_config_validates_and_round_trips() -> None:
    with pytest.raises(ConfigError, match=r"^steps: must be an int >= 1, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match=r"^grad_accum: must divide batch_size \(10\), got 3"):
        TrainConfig(batch_size=10, grad_accum=3)
    with pytest.raises(ConfigError, match=r"^min_lr: must be <= lr"):
        OptimConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ConfigError, match=r"^betas\[1\]: must be a float in \[0.0, 1.0\)"):
        OptimConfig(betas=(0.9, 1.0))
    with pytest.raises(ConfigError, match=r"^optim.warmup_steps: must be <= steps \(5\)"):
        TrainConfig(steps=5, optim=OptimConfig(warmup_steps=6))
    with pytest.raises(ConfigError, match=r"^frozen\[0\]: must be a non-empty dotted module path"):
        TrainConfig(frozen=[""])
    with pytest.raises(ConfigError, match=r"^dtype: must be one of 'float32', 'bfloat16'"):
        TrainConfig(dtype="float16")
    with pytest.raises(ConfigError, match=r"^optim.schedule: must be one of"):
        from_dict(TrainConfig, {"optim": {"schedule": "linear"}})
    cfg = resume_config()
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_train_config_yaml_round_trip(tmp_path: Path) -> None:
    cfg = resume_config()
    (tmp_path / "c.yaml").write_text(dumps_yaml(cfg), encoding="utf-8")
    loaded = load_yaml(tmp_path / "c.yaml", TrainConfig)
    assert loaded == cfg and loaded.optim.betas == (0.9, 0.999)


def test_lr_schedule() -> None:
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [lr_at(s, optim, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, optim, 14) == 1.0 and lr_at(13, optim, 14) == pytest.approx(0.1)
    assert lr_at(4 + 9 // 2, optim, 14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 9)))
    constant = OptimConfig(lr=1.0, warmup_steps=0, schedule="constant")
    assert {lr_at(s, constant, 10) for s in range(10)} == {1.0}


def test_optimizer_decays_only_matrices() -> None:
    model = ToyMLP()
    set_trainable(model, frozen=["body2"])
    groups = build_optimizer(model, OptimConfig(weight_decay=0.1)).param_groups
    shapes = {g["weight_decay"]: sorted(tuple(p.shape) for p in g["params"]) for g in groups}
    assert shapes == {0.1: [(1, 32), (32, 6), (32, 32)], 0.0: [(1,), (32,), (32,)]}


def test_rng_states_round_trip_through_json() -> None:
    state = json.loads(json.dumps(capture_rng()))
    first = (torch.rand(3), random.random(), np.random.rand())
    restore_rng(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_micro_batch_slices_partition_the_global_batch() -> None:
    for world, accum in [(1, 1), (1, 4), (2, 2), (4, 1)]:
        covered = sorted(
            i for r in range(world) for m in range(accum) for i in range(16)[micro_batch_slice(16, accum, m, r, world)]
        )
        assert covered == list(range(16))
    with pytest.raises(ValueError, match="divisible by world_size \\* grad_accum"):
        micro_batch_slice(16, 3, 0, 0, 2)


# ---------------------------------------------------------------- freezing


def test_set_trainable_exact_paths() -> None:
    model = ToyMLP()
    counts = set_trainable(model, trainable=["body"], frozen=["body.0"])
    names = [name for name, _ in trainable_parameters(model)]
    assert names == ["body.2.weight", "body.2.bias"]  # "body" does not catch "body2"
    total = sum(p.numel() for p in model.parameters())
    assert counts == {"trainable": 32 * 32 + 32, "frozen": total - 32 * 32 - 32}

    counts = set_trainable(model, trainable=[], frozen=["body2", "head.bias"])
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"body2.weight", "body2.bias", "head.bias"}
    assert counts["frozen"] == 32 * 32 + 32 + 1

    set_trainable(model, trainable=["body2"])
    assert {name for name, _ in trainable_parameters(model)} == {"body2.weight", "body2.bias"}


def test_set_trainable_unknown_path_lists_suggestions() -> None:
    model = ToyMLP()
    with pytest.raises(ValueError, match=r"frozen: 'body.5' is not a module .*closest valid paths: .*body\.2"):
        set_trainable(model, frozen=["body.5"])
    with pytest.raises(ValueError, match=r"trainable: 'bod' is not a module"):
        set_trainable(model, trainable=["bod"])  # no prefix or substring matching either
    with pytest.raises(TypeError, match="not a single str"):
        set_trainable(model, trainable="body")


# ---------------------------------------------------------------- single process


def test_train_single_process_only_trainable_change(tmp_path: Path) -> None:
    cfg = TrainConfig(
        steps=30,
        batch_size=32,
        log_every=5,
        ckpt_every=0,
        frozen=["body.0", "body2"],  # body.0: frozen inside a trainable FSDP unit; body2: a wholly frozen unit
        fsdp_modules=["Sequential", "body2"],  # a class name and a path
        device="cpu",
        optim=OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=3),
    )
    task = ToyTask(cfg)
    before = initial_state(cfg, task)
    summary = train(task, cfg, tmp_path, progress=False)

    curve = losses(tmp_path)
    assert list(curve) == [5, 10, 15, 20, 25, 30]
    assert curve[30] < 0.5 * curve[5], curve
    after = load_file(tmp_path / "model.safetensors")
    assert after.keys() == before.keys()
    for key in before:
        if key.startswith(("body.0.", "body2.")):
            assert torch.equal(after[key], before[key]), key
        else:
            assert not torch.allclose(after[key], before[key]), key
    assert summary["steps"] == 30 and summary["final"]["loss"] == curve[30]
    assert summary["frozen_params"] == 6 * 32 + 32 + 32 * 32 + 32
    assert [step for step, _ in list_checkpoints(tmp_path)] == [30]
    for name in ("config.yaml", "curves.png", "summary.json", "metrics.jsonl"):
        assert (tmp_path / name).is_file(), name
    assert load_yaml(tmp_path / "config.yaml", TrainConfig) == cfg
    record = next(iter_metrics(tmp_path))
    assert set(record) == {"step", "loss", "mae", "lr", "grad_norm", "samples_per_s", "elapsed_s"}


def test_cpu_training_flushes_denormal_floats(tmp_path: Path) -> None:
    """Floats below 1.2e-38, which x86 cores compute on a slow path, are flushed to zero once a CPU run trains."""

    def denormal() -> float:
        return (torch.tensor([1e-30]) * torch.tensor([1e-10])).item()

    torch.set_flush_denormal(False)
    assert denormal() > 0
    cfg = TrainConfig(steps=2, batch_size=8, log_every=1, ckpt_every=0, device="cpu")
    train(ToyTask(cfg), cfg, tmp_path, progress=False)
    assert denormal() == 0


def test_train_bfloat16_autocast(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=3, batch_size=8, log_every=1, ckpt_every=0, dtype="bfloat16", device="cpu")
    summary = train(ToyTask(cfg), cfg, tmp_path, progress=False)
    assert all(math.isfinite(v) for v in losses(tmp_path).values())
    assert load_file(tmp_path / "model.safetensors")["head.weight"].dtype == torch.float32  # master weights
    assert summary["steps"] == 3


def test_grad_accum_gives_the_global_batch_mean(tmp_path: Path) -> None:
    runs = {}
    for accum in (1, 4):
        cfg = TrainConfig(steps=2, batch_size=16, grad_accum=accum, log_every=1, ckpt_every=0, device="cpu")
        train(ToyTask(cfg), cfg, tmp_path / str(accum), progress=False)
        runs[accum] = [[r["loss"], r["grad_norm"]] for r in iter_metrics(tmp_path / str(accum))]
    torch.testing.assert_close(torch.tensor(runs[4]), torch.tensor(runs[1]), rtol=1e-5, atol=1e-7)


def test_grad_clip_is_applied(tmp_path: Path) -> None:
    # AdamW is nearly invariant to gradient scale, except through eps: clipping the norm to 1e-10
    # (far below eps=1e-8) must shrink the update by orders of magnitude.
    moved = {}
    for clip in (0.0, 1e-10):
        cfg = TrainConfig(
            steps=1, batch_size=16, ckpt_every=0, device="cpu", optim=OptimConfig(lr=1e-2, grad_clip=clip)
        )
        task = ToyTask(cfg)
        before = initial_state(cfg, task)
        train(task, cfg, tmp_path / str(clip), progress=False)
        after = load_file(tmp_path / str(clip) / "model.safetensors")
        moved[clip] = max((after[k] - before[k]).abs().max().item() for k in before)
    assert moved[1e-10] < 1e-2 * moved[0.0], moved


def test_resume_is_exact(tmp_path: Path) -> None:
    cfg = resume_config()
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train(ToyTask(cfg, noise=0.1), cfg, full, progress=False)
    with pytest.raises(Crash):
        train(ToyTask(cfg, noise=0.1, crash_at=CRASH_AT), cfg, crashed, progress=False)
    assert [step for step, _ in list_checkpoints(crashed)] == [4]
    assert list(losses(crashed)) == list(range(1, CRASH_AT + 1))  # steps 5, 6 ran but were not saved
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(ToyTask(cfg), cfg, crashed, progress=False)

    summary = train(ToyTask(cfg, noise=0.1), cfg, crashed, resume=True, progress=False)
    assert summary["resumed_from"] == 4
    # The lines the crashed session wrote past its checkpoint were replaced, not duplicated.
    assert [record["step"] for record in iter_metrics(crashed)] == list(range(1, 11))
    for key in ("loss", "mae", "grad_norm", "lr"):
        torch.testing.assert_close(
            torch.tensor(list(losses(crashed, key).values()), dtype=torch.float64),
            torch.tensor(list(losses(full, key).values()), dtype=torch.float64),
            rtol=0,
            atol=0,
            msg=key,
        )
    a, b = load_file(full / "model.safetensors"), load_file(crashed / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert [step for step, _ in list_checkpoints(full)] == [8, 10]  # keep_checkpoints=2 pruned step 4

    class MustNotBuild(ToyTask):
        def build_model(self) -> nn.Module:
            raise AssertionError("a finished run must not be rebuilt")

    again = train(MustNotBuild(cfg), cfg, crashed, resume=True, progress=False)
    assert again == json.loads((crashed / "summary.json").read_text())


def test_two_cpu_ranks_match_single_process(tmp_path: Path) -> None:
    cfg, single, ranks = resume_config(), tmp_path / "single", tmp_path / "ranks"
    train(ToyTask(cfg), cfg, single, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    proc = subprocess.run(
        [*cmd, str(ranks)], env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for run in ("full", "crash"):
        assert json.loads((ranks / run / "summary.json").read_text())["world_size"] == 2
        for key in ("loss", "grad_norm"):  # a sum over ranks instead of a mean would double the norm
            got, want = losses(ranks / run, key), losses(single, key)
            assert list(got) == list(want)
            torch.testing.assert_close(
                torch.tensor(list(got.values())), torch.tensor(list(want.values())), rtol=1e-4, atol=1e-6
            )
    # Resume on 2 ranks from the sharded checkpoint (one .distcp file per rank) is exact.
    assert losses(ranks / "crash") == losses(ranks / "full")
    assert json.loads((ranks / "crash" / "summary.json").read_text())["resumed_from"] == 4
    shards = sorted(p.name for p in (ranks / "full" / "checkpoints" / "step-000010").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    a, b = load_file(single / "model.safetensors"), load_file(ranks / "full" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    initial = initial_state(cfg, ToyTask(cfg))
    for key in ("body.0.weight", "body.0.bias", "body2.weight", "body2.bias"):
        assert torch.equal(b[key], initial[key]), key


# ---------------------------------------------------------------- checkpoints and export


def test_latest_checkpoint_ignores_tmp(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    for name in ("step-000004", "step-000012", "step-000020.tmp"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-000016").mkdir()  # no trainer_state.json: never completed
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000012"
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 12]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor([2.0]))


def test_export_model_plain_and_sharded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tied()
    export_model(model, tmp_path / "plain.safetensors")
    tensors = load_file(tmp_path / "plain.safetensors")
    assert tensors.keys() == model.state_dict().keys()
    assert all(torch.equal(tensors[k], v) for k, v in model.state_dict().items())

    fresh = Tied()
    load_model_weights(fresh, tmp_path / "plain.safetensors")
    assert torch.equal(fresh.embed.weight, model.embed.weight) and fresh.out.weight is fresh.embed.weight

    info = init_distributed("cpu")
    try:
        mlp = ToyMLP()
        full = {k: v.clone() for k, v in mlp.state_dict().items()}
        shard_model(mlp, ["body"], make_mesh(info))
        assert type(mlp.body[0].weight).__name__ == "DTensor"
        export_model(mlp, tmp_path / "sharded.safetensors")
        got = load_file(tmp_path / "sharded.safetensors")
        assert got.keys() == full.keys() and all(torch.equal(got[k], full[k]) for k in full)
        assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away
    finally:
        cleanup()
