"""PNN: a column per task, earlier columns frozen, new columns reading them through laterals."""
import subprocess
import sys

import pytest
import torch

from sparsecl import SparseCLError
from sparsecl.config import merge_config
from sparsecl.engine.trainer import Trainer


def cfg(**extra):
    base = dict(method="pnn", benchmark="digits", setting="task-il", epochs=1, batch_size=16, seed=0,
                device="cpu", method_options={"lr": 0.05})
    base.update(extra)
    return merge_config(base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    trainer = Trainer(cfg(), tmp_path_factory.mktemp("pnn") / "run")
    ends, begins = [], []
    end, begin = trainer.method.end_task, trainer.method.begin_task

    def spy_begin(task):
        begin(task)
        begins.append({k: v.clone() for k, v in trainer.method.laterals[task.index].state_dict().items()})

    def spy(task):
        end(task)
        m = trainer.method
        ends.append([{k: v.clone() for k, v in c.state_dict().items()} for c in m.columns]
                    + [{k: v.clone() for k, v in lat.state_dict().items()} for lat in m.laterals])
    trainer.method.end_task, trainer.method.begin_task = spy, spy_begin
    result = trainer.run()
    return trainer, result, ends, begins


def test_earlier_columns_never_change(trained):
    trainer, result, ends, _ = trained
    m = trainer.method
    assert len(m.columns) == 5
    for t in range(4):
        for j in range(t + 1):  # column j and its laterals after task t == at the very end
            col, lat = ends[t][j], ends[t][t + 1 + j]
            assert all(torch.equal(v, m.columns[j].state_dict()[k]) for k, v in col.items())
            assert all(torch.equal(v, m.laterals[j].state_dict()[k]) for k, v in lat.items())
    R = result["accuracy"]["task_il"]["matrix"]
    assert all(R[i][j] == R[j][j] for j in range(5) for i in range(j, 5))


def test_a_new_column_reads_earlier_columns_through_its_laterals(trained):
    trainer, _, ends, begins = trained
    m = trainer.method
    x = m.ctx.augment.eval(trainer.stream.tasks[1].test.x[:16])
    trainer.model.eval()
    with torch.no_grad():
        ref = m.column_logits(x, 1)
        w = m.columns[0].net[1].weight  # column 1's first layer (task 1's own column)
        saved = w.clone()
        w.mul_(-1.0)
        moved = m.column_logits(x, 1)
        w.copy_(saved)
        # cutting column 2's laterals (U = 0) changes its logits too
        for a in m.laterals[1]:
            a.u.weight.zero_()
        cut = m.column_logits(x, 1)
        m.laterals[1].load_state_dict(ends[-1][5 + 1])
    assert not torch.allclose(ref, moved)  # column 2's output depends on column 1
    assert not torch.allclose(ref, cut)
    # the laterals were trained with their column (alpha, V and U all moved during task 2)
    trained_lat = m.laterals[1].state_dict()
    assert all(not torch.equal(trained_lat[k], v) for k, v in begins[1].items())


def test_model_size_grows_per_column_and_lateral_flops_are_reported(trained):
    _, result, _, _ = trained
    rep = result["method"]
    s = rep["size_total"]
    assert s[0] == 1.0 and all(b - a > 1.0 for a, b in zip(s, s[1:]))  # a full column + laterals each task
    assert rep["lateral_train_flops"] > 0
    per_task = result["flops"]["per_task"]
    assert all(a < b for a, b in zip(per_task, per_task[1:]))  # earlier columns' forwards are charged


def test_residual_backbone_is_refused_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "sparsecl", "run", "--method", "pnn", "--benchmark", "digits",
                        "--setting", "task-il", "--backbone", "resnet18", "--epochs", "1", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "sequential backbone" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_presets_load_and_validate():
    from preset_check import check_presets
    check_presets(["seq-mnist-pnn", "seq-cifar10-jpeg-pnn"])


def test_resume_gives_the_same_result(tmp_path):
    from interrupt import run_interrupted
    from sparsecl.engine.trainer import resume, run

    full, _ = run(cfg(), tmp_path / "full")
    run_interrupted(cfg(), tmp_path / "cut", at_task=2)
    resumed, _ = resume(tmp_path / "cut")
    assert resumed["accuracy"] == full["accuracy"] and resumed["method"] == full["method"]


def test_export_is_refused_in_one_line(trained):
    trainer = trained[0]
    p = subprocess.run([sys.executable, "-m", "sparsecl", "export", str(trainer.run_dir)], capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "cannot be exported" in p.stderr and len(p.stderr.strip().splitlines()) == 1
