"""CUDA-only checks of the sparse methods (skipped without a GPU; run on the GPU box)."""
import pytest
import torch

from sparsecl.config import merge_config
from sparsecl.engine.trainer import run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BASE = {"benchmark": "digits", "epochs": 3, "batch_size": 16, "device": "cuda", "seed": 0,
        "method_options": {"lr": 0.05, "buffer_size": 64, "minibatch_size": 16, "alpha": 0.3, "beta": 0.5,
                           "sparsity": 0.5}}


def _check_masked(run_dir):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    masks = ckpt["method"]["masks"]["masks"]
    model = torch.load(run_dir / "model.pt", weights_only=True)
    for name, m in masks.items():
        assert int(m.sum()) == round(0.5 * m.numel())
        assert bool((model[name][~m.bool()] == 0).all())


def test_snip_cuda_graph_counts_like_eager_and_keeps_the_mask(tmp_path):
    base = {**BASE, "method": "snip-der++"}
    eager, _ = run(merge_config(base), tmp_path / "eager")
    graphed, _ = run(merge_config({**base, "cuda_graph": True}), tmp_path / "graph")
    assert graphed["samples"] == eager["samples"]
    assert graphed["flops"]["train"] == eager["flops"]["train"]
    assert graphed["sparsity"]["overall"]["density"] == eager["sparsity"]["overall"]["density"] == 0.5
    assert abs(graphed["accuracy"]["class_il"]["acc"] - eager["accuracy"]["class_il"]["acc"]) < 10
    assert graphed["accuracy"]["class_il"]["acc"] > 50
    _check_masked(tmp_path / "graph")


def test_rigl_on_cuda_with_amp_and_channels_last(tmp_path):
    cfg = merge_config({**BASE, "method": "rigl-der++", "amp": True, "channels_last": True,
                        "method_options": {**BASE["method_options"], "delta_t": 5}})
    r, _ = run(cfg, tmp_path / "r")
    assert r["complete"] and r["accuracy"]["class_il"]["acc"] > 40
    _check_masked(tmp_path / "r")
