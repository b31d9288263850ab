"""The FLOP planner (`sparsecl flops`): a planned protocol equals a real run's count exactly, SparCL's
Table 1 dense counts under the sparcl-paper convention, and the selection cost of SparCL's presets."""
from pathlib import Path

import pytest
import torch

from sparsecl.cli import main
from sparsecl.config import load_preset, merge_config
from sparsecl.engine.planner import plan_flops
from sparsecl.engine.trainer import run

CIFAR_SLICE = Path(__file__).parent / "fixtures" / "cifar10-jpeg-slice"  # 4 train JPEGs per class


def digits(method, **opts):
    return dict(method=method, benchmark="digits", epochs=4, batch_size=16, seed=3, device="cpu",
                method_options={"lr": 0.05, "buffer_size": 50, **opts})


SPARCL = dict(alpha=0.3, beta=0.5, sparsity=0.75, delta_k=0.5, p_intra=0.02, p_inter=0.05, ddr_cutoff=4,
              dgm_interval=7, importance_every=3)
CASES = {
    "der++": digits("der++", alpha=0.3, beta=0.5),
    "sparcl-der++ (DDR, DGM)": digits("sparcl-der++", **SPARCL),
    "sparcl-er (DDR, no DGM)": digits("sparcl-er", **{k: v for k, v in SPARCL.items() if k not in ("alpha", "beta")},
                                      dgm=False),
    "rigl-der++": digits("rigl-der++", alpha=0.3, beta=0.5, sparsity=0.9, delta_t=5),
    "ewc": {**digits("ewc"), "method_options": {"lr": 0.05}},
    "a-gem (Mammoth's one batch per task)": digits("a-gem", memory="batch", buffer_size=80),
    "sgd": {**digits("sgd"), "method_options": {"lr": 0.05}},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("convention", ["spec", "sparcl-paper"])
def test_planned_flops_equal_a_real_runs_count_exactly(tmp_path, case, convention):
    cfg = dict(CASES[case], flop_convention=convention)
    result, _ = run(merge_config(cfg), tmp_path / "r")
    plan = plan_flops(merge_config(cfg))
    f = result["flops"]
    assert plan["train"] == f["train"] and plan["dense_equivalent"] == f["dense_equivalent"]
    assert plan["per_task"] == f["per_task"]
    assert plan["conventions"] == f["conventions"]
    assert plan["selection"] == f["selection"]
    assert plan["samples"]["trained"] == result["samples"]["trained"]
    if case.startswith("sparcl-"):
        assert f["selection"]["flops"] > 0
        assert sum(t["removed_examples"] for t in result["method"]["sparcl"]["tasks"]) > 0


def test_sparcl_paper_convention_gives_table_1_dense_counts():
    """SparCL Table 1, seq-cifar10: DER++ 13.9e15, ER 11.1e15, EWC 8.3e15 (SPEC: 13.89 / 11.11 /
    8.33e15); under the spec convention DER++ is 25.0e15."""
    paper = {name: plan_flops(merge_config(dict(load_preset(name), flop_convention="sparcl-paper")))["train"]
             for name in ("seq-cifar10-der++-500", "seq-cifar10-er-500", "seq-cifar10-ewc")}
    assert [f"{v:.3g}" for v in paper.values()] == ["1.39e+16", "1.11e+16", "8.33e+15"]
    assert f"{plan_flops(merge_config(load_preset('seq-cifar10-der++-500')))['train']:.3g}" == "2.5e+16"


@pytest.mark.parametrize("preset", ["seq-cifar10-sparcl-der++-500-sp75", "seq-cifar10-sparcl-er-500-sp75",
                                    "seq-mnist-sparcl-der++-500-sp75",
                                    "seq-mnist-sparcl-der++-500-sp90"])
def test_sparcl_presets_spend_under_2_percent_on_selection(preset):
    for convention in ("spec", "sparcl-paper"):
        plan = plan_flops(merge_config(dict(load_preset(preset), flop_convention=convention)))
        assert 0 < plan["selection"]["share_of_train"] < 0.02


def test_selection_cost_of_a_short_cifar10_shaped_run_is_reported_and_small(tmp_path):
    """Real CIFAR-10 JPEGs through ResNet-18 (nf 4) with the seq-cifar10 SparCL-DER++ preset's
    options: stages long enough for the default importance_every, selection < 2 % of the FLOPs."""
    torch.set_flush_denormal(True)  # a 4-channel sparse ResNet makes denormals: ~100x slower backward on CPU
    opts = dict(load_preset("seq-cifar10-sparcl-der++-500-sp75")["method_options"],
                buffer_size=20, minibatch_size=2, delta_k=7, ddr_cutoff=1)
    # 2 tasks of 5 classes (20 JPEGs each), batch 2: 70 steps per stage, 2 stages per task
    cfg = dict(method="sparcl-der++", benchmark="image-folder", data_root=str(CIFAR_SLICE), n_tasks=2, epochs=14,
               batch_size=2, backbone="resnet18", backbone_options={"nf": 4}, seed=0, device="cpu",
               method_options=opts)
    try:
        result, _ = run(merge_config(cfg), tmp_path / "r")
    finally:
        torch.set_flush_denormal(False)
    sel = result["flops"]["selection"]
    assert sel["samples"] > 0 and 0 < sel["share_of_train"] < 0.02
    assert plan_flops(merge_config(cfg))["selection"] == sel


def test_flops_command_prints_both_conventions_and_rejects_unplanned_methods(capsys):
    assert main(["flops", "--preset", "seq-cifar10-der++-500", "--convention", "sparcl-paper"]) == 0
    out = capsys.readouterr().out
    assert "1.389e+16" in out and "2.502e+16" in out and "sparcl-paper (selected)" in out
    assert main(["flops", "--method", "lwf", "--benchmark", "digits"]) != 0
    err = capsys.readouterr().err.strip()
    assert "does not model method 'lwf'" in err and len(err.splitlines()) == 1


def test_report_shows_either_convention(tmp_path, capsys):
    result, run_dir = run(merge_config(dict(digits("der++", alpha=0.3, beta=0.5), epochs=1)), tmp_path / "r")
    paper = result["flops"]["conventions"]["sparcl-paper"]["train"]
    assert result["flops"]["convention"] == "spec" and paper < result["flops"]["train"]  # replay: one forward
    for convention, value in (("spec", result["flops"]["train"]), ("sparcl-paper", paper)):
        assert main(["report", str(run_dir), "--format", "csv", "--flop-convention", convention]) == 0
        assert f"{value:.3e}" in capsys.readouterr().out
