"""Distributed training: real 2-process Gloo runs under torchrun on CPU give the single-process
accuracy matrix at the same global batch; resume under torchrun; one-line errors."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsecl import SparseCLError
from sparsecl.config import merge_config
from sparsecl.engine.trainer import check_distributed, run
from sparsecl.methods import METHODS

# The embedded digits benchmark with its MLP (no BatchNorm), 1 epoch; 16 = 2 ranks x 8.
BASE = ["--benchmark", "digits", "--epochs", "1", "--batch-size", "16", "--seed", "1", "--device", "cpu", "--quiet"]
CASES = {
    "er": ["--method", "er", "--buffer", "50", "--lr", "0.05"],
    "der++": ["--method", "der++", "--buffer", "50", "--lr", "0.05", "-o", "alpha=0.3", "-o", "beta=0.5"],
    # RigL updates every 5 steps: masks move during training and must stay equal on both ranks.
    "rigl-der++": ["--method", "rigl-der++", "--buffer", "50", "--lr", "0.05", "-o", "sparsity=0.8", "-o", "delta_t=5"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform == "linux":  # Gloo over loopback: no need for the host name to resolve (CI sandboxes)
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "sparsecl", "run", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def single(args: list[str], out: Path) -> dict:
    """The same CLI arguments in this (single) process."""
    from sparsecl.cli import build_config, make_parser

    torch.set_num_threads(1)  # like each torchrun rank (OMP_NUM_THREADS=1); faster on a shared CPU
    cfg = build_config(make_parser().parse_args(["run", *args]))
    return run(cfg, out)[0]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One torchrun launch per case (der++ keeps every checkpoint for the resume test)."""
    root = tmp_path_factory.mktemp("ddp")
    out = {}
    for name, extra in CASES.items():
        keep = ["--keep-checkpoints", "all"] if name == "der++" else []
        proc = torchrun([*BASE, *extra, *keep, "--out", str(root / name)], root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("results:") == 1  # only rank 0 reports
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one_process_at_the_same_global_batch(name, ddp_runs, tmp_path):
    ddp = json.loads((ddp_runs[name] / "result.json").read_text())
    one = single([*BASE, *CASES[name]], tmp_path / "one")
    assert ddp["distributed"] == {"world_size": 2, "backend": "gloo", "per_rank_batch": 8}
    # Accuracies are percentages of counts: any real divergence of the runs would show.
    assert ddp["accuracy"] == one["accuracy"]
    assert ddp["samples"] == one["samples"] and ddp["flops"]["train"] == one["flops"]["train"]
    # Losses differ only by float summation order (per-rank means averaged vs one global mean).
    for a, b in zip(ddp["loss_per_epoch"], one["loss_per_epoch"]):
        assert a == pytest.approx(b, rel=1e-5)
    ckpt = torch.load(ddp_runs[name] / "checkpoint.pt", weights_only=True)
    ref = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    buf, ref_buf = ckpt["method"]["buffer"], ref["method"]["buffer"]
    assert buf["seen"] == ref_buf["seen"]
    assert all(torch.equal(buf["store"][k], ref_buf["store"][k]) for k in ("x", "y", "task"))
    if "masks" in ckpt["method"]:
        masks, ref_masks = ckpt["method"]["masks"]["masks"], ref["method"]["masks"]["masks"]
        assert all(torch.equal(masks[k], ref_masks[k]) for k in masks)


def test_resume_under_torchrun_continues_identically(ddp_runs, tmp_path):
    full = ddp_runs["der++"]
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.yaml").write_text((full / "config.yaml").read_text())
    (cut / "checkpoint.pt").write_bytes((full / "checkpoint-task2.pt").read_bytes())
    proc = torchrun(["--resume", str(cut), "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads((full / "result.json").read_text()), json.loads((cut / "result.json").read_text())
    assert a["accuracy"] == b["accuracy"] and a["loss_per_epoch"] == b["loss_per_epoch"]
    wa, wb = torch.load(full / "model.pt", weights_only=True), torch.load(cut / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_compiled_ddp_matches_one_eager_process(ddp_runs, tmp_path):
    """--compile under torchrun compiles the DDP module (aot_eager here: dynamo + AOT autograd
    without inductor's minutes of CPU code generation): the single-process eager result."""
    proc = torchrun([*BASE, *CASES["der++"], "--compile", "aot_eager", "--out", str(tmp_path / "c")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "c" / "result.json").read_text())
    one = json.loads((ddp_runs["der++"] / "result.json").read_text())  # equal to one process (test above)
    assert ddp["samples"] == one["samples"] and ddp["flops"]["train"] == one["flops"]["train"]
    for a, b in zip(ddp["accuracy"]["class_il"]["matrix"], one["accuracy"]["class_il"]["matrix"]):
        assert all(abs(x - y) <= 1.0 for x, y in zip(a, b) if x is not None)


@pytest.mark.parametrize("rank", [0, 1])
def test_batch_not_divisible_by_world_size_is_one_error_line(rank, monkeypatch, capsys, tmp_path):
    # What each torchrun rank does: the check runs before the ranks meet, only rank 0 prints.
    from sparsecl.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    assert main(["run", *BASE, "--method", "sgd", "--batch-size", "15", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    expected = ("sparsecl: error: batch size 15 is not divisible by the world size 2 "
                "(the batch size is the global batch, split evenly over the ranks)\n")
    assert err == (expected if rank == 0 else "")
    assert not (tmp_path / "r").exists()


def test_unsupported_method_is_a_clear_error():
    with pytest.raises(SparseCLError, match="^method lwf does not support distributed training"):
        check_distributed(merge_config({"method": "lwf", "batch_size": 16}), 2)
    # Support is declared per class: subclasses that change the step do not inherit it.
    assert METHODS.get("der++").supports_distributed and not METHODS.get("esacl-der++").supports_distributed
    if not torch.cuda.is_available():
        with pytest.raises(SparseCLError, match="--sync-bn needs CUDA"):
            check_distributed(merge_config({"method": "sgd", "sync_bn": True}), 2)
