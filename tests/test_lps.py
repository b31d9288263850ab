"""LPS: per-task ADMM pruning, earlier tasks frozen bit-exactly, a learned selection of shared weights."""
import pytest
import torch

from sparsecl.config import merge_config
from sparsecl.engine.trainer import Trainer


def cfg(**opts):
    options = {"lr": 0.05, "retrain_epochs": 1, "admm_epochs": 1, "rho_num": 2}
    options.update(opts)
    return merge_config(dict(method="lps", benchmark="digits", setting="task-il", epochs=1, batch_size=16,
                             seed=0, device="cpu", method_options=options))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    trainer = Trainer(cfg(), tmp_path_factory.mktemp("lps") / "run")
    ends = []
    end = trainer.method.end_task

    def spy(task):
        end(task)
        ends.append({k: v.detach().clone() for k, v in trainer.model.named_parameters()})
    trainer.method.end_task = spy
    return trainer, trainer.run(), ends


def test_earlier_tasks_weights_stay_bit_identical_and_their_accuracy_unchanged(trained):
    trainer, result, ends = trained
    own = trainer.method.ownership
    final = dict(trainer.model.named_parameters())
    for t in range(4):
        for n in own.names:
            mine = own.owned(n, task=t)
            assert torch.equal(final[n][mine], ends[t][n][mine])  # exact bits, every later task
        for name, p in final.items():
            if name.startswith(f"head.heads.{t}."):
                assert torch.equal(p, ends[t][name])
    R = result["accuracy"]["task_il"]["matrix"]
    assert all(R[i][j] == R[j][j] for j in range(5) for i in range(j, 5))


def test_each_task_prunes_to_its_share_and_shares_a_selected_subset(trained):
    trainer, result, _ = trained
    m, own = trainer.method, trainer.method.ownership
    counts = [sum(int(own.owned(n, task=t).sum()) for n in own.names) for t in range(5)]
    total = sum(own.owner[n].numel() for n in own.names)
    assert counts[0] == pytest.approx(total / 5, rel=0.01) and sum(counts) == total  # last task: the rest
    assert m.selections[0] == {}
    for t in range(1, 5):
        for n in own.names:
            sel, earlier = m.selections[t][n], own.owned(n, upto=t - 1)
            assert not (sel & ~earlier).any()  # only earlier tasks' weights are shared
            assert int(sel.sum()) == pytest.approx(0.9 * int(earlier.sum()), abs=1)
    assert result["method"]["shared_fraction"][1:] == pytest.approx([0.9] * 4, abs=1e-3)


def test_a_task_runs_with_its_own_and_selected_weights_only(trained):
    trainer, _, _ = trained
    m, own = trainer.method, trainer.method.ownership
    x = m.ctx.augment.eval(trainer.stream.tasks[2].test.x[:16])
    with m.evaluation():
        ref = m.eval_logits(x, 2).clone()
    params = dict(trainer.model.named_parameters())
    with torch.no_grad():
        saved = {n: params[n].clone() for n in own.names}
        for n in own.names:  # change every weight task 2 does not use
            unused = ~(own.owned(n, task=2) | m.selections[2][n])
            params[n].add_(unused * 0.5)
        with m.evaluation():
            assert torch.equal(m.eval_logits(x, 2), ref)
        for n in own.names:
            params[n].copy_(saved[n])


def test_admm_pulls_the_free_weights_towards_the_kept_ones(tmp_path):
    trainer = Trainer(cfg(rho=1.0, rho_num=1, admm_epochs=2, retrain_epochs=0), tmp_path / "r")
    m = trainer.method
    observed = []
    stage = m._admm_stage

    def spy(task, rho, counts, old, scores):
        stage(task, rho, counts, old, scores)
        if task.index == 0:
            w = trainer.model.backbone.net[1].weight.detach()
            keep = m._keep(task)["backbone.net.1.weight"]
            observed.append((w[keep].abs().mean().item(), w[~keep].abs().mean().item()))
    m._admm_stage = spy
    trainer.run()
    kept, pruned = observed[0]
    assert pruned < 0.5 * kept  # the weights the projection drops are driven towards 0


def test_presets_load_and_validate():
    from preset_check import check_presets
    check_presets(["seq-mnist-lps", "seq-cifar10-lps", "seq-cifar10-jpeg-lps"])


def test_resume_gives_the_same_result(tmp_path):
    from interrupt import run_interrupted
    from sparsecl.engine.trainer import resume, run

    full, _ = run(cfg(rho_num=1), tmp_path / "full")
    run_interrupted(cfg(rho_num=1), tmp_path / "cut", at_task=2)
    resumed, _ = resume(tmp_path / "cut")
    assert resumed["accuracy"] == full["accuracy"] and resumed["method"] == full["method"]


def test_export_reproduces_every_tasks_accuracy(trained, tmp_path):
    from export_check import exported_task_il
    trainer, result, _ = trained
    assert exported_task_il(trainer.run_dir, tmp_path / "m.pt") == result["accuracy"]["task_il"]["matrix"][-1]
