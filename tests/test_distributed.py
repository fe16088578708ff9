"""Data-parallel training on torch.distributed, started by torchrun, on this machine's CPU (gloo).

The multi-process tests run tests/ddp_worker.py (a small MLP on the real training loop) under torchrun
and compare the final weights with those of one process that takes the same global batches.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from layerwise.data.batches import TensorBatches
from layerwise.training.distributed import ProcessGroup, RankBatches, part_of, shard_units

WORKER = Path(__file__).with_name("ddp_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def run(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("one") / "run"
    result = run([sys.executable, str(WORKER), str(out)])
    assert result.returncode == 0, result.stderr
    return weights(out)


# ---------------------------------------------------------------------- in one process


def test_the_parts_of_a_batch_cover_it_without_overlap():
    x, targets = torch.arange(10), [{"boxes": i} for i in range(10)]
    parts = [part_of((x, targets), rank, 3) for rank in range(3)]
    assert torch.cat([p[0] for p in parts]).tolist() == list(range(10))
    assert [t["boxes"] for p in parts for t in p[1]] == list(range(10))
    assert [len(p[0]) for p in parts] == [4, 3, 3]


def test_each_rank_reads_its_own_part_of_the_same_global_batches():
    inputs, labels = torch.arange(40).float().view(40, 1), torch.arange(40)
    batches = TensorBatches(inputs, labels, 8, lambda x: x, shuffle=True, seed=3)
    whole = [y for _, y in batches.epoch(2)]
    parts = [[y for _, y in RankBatches(batches, ProcessGroup(rank, 2)).epoch(2)] for rank in range(2)]
    for i, batch in enumerate(whole):
        assert torch.cat([parts[0][i], parts[1][i]]).tolist() == batch.tolist()
    assert len(RankBatches(batches, ProcessGroup(1, 2))) == len(batches)


def test_fsdp_gathers_each_stage_on_its_own_and_leaves_a_tied_embedding_to_the_whole():
    from layerwise.models.convnet import convnet_s
    from layerwise.models.gpt import gpt_tiny

    for network, expected in [
        (convnet_s(1, 10), ["stages.stem", "stages.stage1", "stages.stage2"]),
        (gpt_tiny(vocab_size=100, context_len=32), [f"blocks.{i}" for i in range(4)]),  # not "embed": the LM head
        (torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)), ["0", "2"]),
    ]:
        names = {id(m): name for name, m in network.named_modules()}
        assert [names[id(unit)] for unit in shard_units(network)] == expected


# ---------------------------------------------------------------------- several processes


@pytest.mark.slow
def test_two_sharded_processes_take_the_steps_of_one_and_their_checkpoint_resumes_either_way(tmp_path, one_process):
    # FSDP: each process holds half of every weight and AdamW moment; checkpoints hold them whole. Rank 1 dies at
    # step 7. From the checkpoint of step 6, one unsharded process and two sharded ones each finish the run, and
    # both must end where one process ends.
    out, again = tmp_path / "run", tmp_path / "again"
    sharded = [*TORCHRUN, "--standalone", "--nproc-per-node=2", str(WORKER)]
    result = run([*sharded, str(out), "--strategy", "fsdp", "--die-at", "7"])
    assert result.returncode != 0 and "exitcode  : 17" in result.stderr
    shutil.copytree(out, again)
    for command in ([sys.executable, str(WORKER), str(out)], [*sharded, str(again), "--strategy", "fsdp"]):
        result = run([*command, "--resume"])
        assert result.returncode == 0, result.stderr
        assert "resuming from step_000000006" in result.stderr
    assert_same_weights(weights(out), one_process)
    assert_same_weights(weights(again), one_process)


@pytest.mark.slow
def test_two_machines_on_localhost_meet_through_a_c10d_rendezvous(tmp_path, one_process):
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                *TORCHRUN,
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=layerwise-test",
                str(WORKER),
                str(tmp_path / "run"),
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"},
        )  # fmt: skip
        for rank in range(2)
    ]
    outputs = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert_same_weights(weights(tmp_path / "run"), one_process)


@pytest.mark.slow
def test_a_rendezvous_that_cannot_complete_fails_within_its_timeout(tmp_path):
    started = time.perf_counter()
    result = run(
        [
            *TORCHRUN,
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            "--rdzv-conf=join_timeout=5",
            str(WORKER),
            str(tmp_path / "run"),
        ],  # fmt: skip
        timeout=90,
    )
    assert result.returncode != 0
    assert time.perf_counter() - started < 60
    assert "RendezvousTimeoutError" in result.stderr or "timed out" in result.stderr.lower()


@pytest.mark.slow
def test_a_dead_rank_ends_the_run_and_another_number_of_processes_resumes_it(tmp_path, one_process):
    out = tmp_path / "run"
    started = time.perf_counter()
    result = run([*TORCHRUN, "--standalone", "--nproc-per-node=2", str(WORKER), str(out), "--die-at", "7"])
    assert result.returncode != 0 and time.perf_counter() - started < 60
    assert "exitcode  : 17" in result.stderr  # torchrun names the rank that died
    assert not (out / "final.safetensors").exists()
    # One process picks the run up from the last checkpoint the two wrote and finishes it exactly.
    result = run([sys.executable, str(WORKER), str(out), "--resume"])
    assert result.returncode == 0, result.stderr
    assert "resuming from step_000000006" in result.stderr
    assert_same_weights(weights(out), one_process)


@pytest.mark.slow
def test_torchrun_restarts_after_a_dead_rank_and_resumes_from_the_checkpoint(tmp_path, one_process):
    # Also the plain case: two processes, before the death and after the restart, take the steps of one.
    out = tmp_path / "run"
    command = [*TORCHRUN, "--standalone", "--nproc-per-node=2", "--max-restarts=1", str(WORKER), str(out)]
    result = run([*command, "--die-at", "7"])
    assert result.returncode == 0, result.stderr
    assert "resuming from step_000000006" in result.stderr
    assert_same_weights(weights(out), one_process)


@pytest.mark.slow
def test_train_with_devices_2_writes_the_run_once(tmp_path):
    # Detection: its validation computes torchmetrics' mAP on rank 0 alone, which must not wait for rank 1.
    from layerwise.data.scenes import compose_scenes

    scenes = compose_scenes(tmp_path / "scenes", 40, seed=0, split="train")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "layerwise", "train", str(scenes), "--out", str(out)]
    result = run([*command, "--epochs", "1", "--devices", "2", "--no-progress"], timeout=300)
    assert result.returncode == 0, result.stderr
    assert "launching 2 processes" in result.stderr
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] > 0 and "map_50" in summary["metrics"]
    assert [json.loads(line)["epoch"] for line in (out / "history.jsonl").read_text().splitlines()] == [1]
    assert result.stdout.count("run directory:") == 1  # rank 1 printed no summary


@pytest.mark.slow
def test_pretrain_with_devices_2_writes_the_run_once(tmp_path, fashion_train):
    out = tmp_path / "pretrain"
    command = [sys.executable, "-m", "layerwise", "pretrain", str(fashion_train), "--out", str(out)]
    result = run([*command, "--epochs", "1", "--batch-size", "32", "--devices", "2", "--no-progress"], timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 540 // 32  # global batches: each rank takes half
    assert result.stdout.count("run directory:") == 1
