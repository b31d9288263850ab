"""docs/method-contract.md's example sparse method, run as written."""
import re
from pathlib import Path

import pytest
import torch

from sparsecl.config import merge_config
from sparsecl.engine.trainer import run
from sparsecl.methods import METHODS

DOC = Path(__file__).resolve().parents[1] / "docs" / "method-contract.md"


@pytest.fixture
def example_method():
    code = re.findall(r"```python\n(.*?)\n```", DOC.read_text(), re.S)
    assert len(code) == 1 and len(code[0].splitlines()) < 60
    namespace: dict = {"__name__": "method_contract_example"}
    exec(compile(code[0], str(DOC), "exec"), namespace)
    try:
        yield namespace["MagnitudeER"]
    finally:
        METHODS.remove("magnitude-er")


def test_the_documented_sparse_method_trains_sparse_and_runs_on_the_kernels(tmp_path, example_method):
    def cfg(method, kernels="off", **opts):
        return merge_config(dict(method=method, benchmark="digits", epochs=1, batch_size=16, seed=0, device="cpu",
                                 threads=1, sparse_kernels=kernels, method_options={"buffer_size": 50, **opts}))

    er, _ = run(cfg("er"), tmp_path / "er")
    sparse, run_dir = run(cfg("magnitude-er", sparsity=0.8), tmp_path / "sparse")
    assert abs(sparse["sparsity"]["overall"]["density"] - 0.2) < 0.01
    assert sparse["flops"]["train"] < 0.5 * er["flops"]["train"]
    state = torch.load(run_dir / "model.pt", weights_only=True)
    masks = torch.load(run_dir / "checkpoint.pt", weights_only=True)["method"]["masks"]["masks"]
    assert masks and all(not bool(state[n][~m].any()) for n, m in masks.items())  # inactive weights stayed zero
    on_kernels, _ = run(cfg("magnitude-er", "on", sparsity=0.8), tmp_path / "kernels")
    assert on_kernels["flops"] == sparse["flops"] and on_kernels["samples"] == sparse["samples"]
