"""CL-LSG's Fine-tune baseline (``finetune-per-task``): a model per task, each started from the
previous task's model; task j is evaluated with model j; model size T x."""
import torch

from sparsecl.config import merge_config
from sparsecl.engine.trainer import Trainer


def cfg(**extra):
    return merge_config(dict(method="finetune-per-task", benchmark="digits", setting="task-il", epochs=2,
                             batch_size=16, seed=0, device="cpu", method_options={"lr": 0.05}, **extra))


def test_each_task_is_evaluated_with_its_own_model_started_from_the_previous(tmp_path):
    trainer = Trainer(cfg(), tmp_path / "run")
    starts = []
    begin = trainer.method.begin_task

    def spy(task):
        begin(task)
        starts.append({k: v.clone() for k, v in trainer.model.backbone.state_dict().items()})
    trainer.method.begin_task = spy
    result = trainer.run()
    method = trainer.method
    assert len(method.models) == 5
    for t in range(1, 5):  # task t starts from task t-1's trained model, not from the initial weights
        assert all(torch.equal(starts[t][k], method.models[t - 1][k]) for k in starts[t])
        assert not all(torch.equal(method.models[t][k], method.models[t - 1][k]) for k in starts[t])
    R = result["accuracy"]["task_il"]["matrix"]
    assert all(R[4][j] == R[j][j] for j in range(5))  # model j serves task j: nothing forgotten
    # evaluating task j loads model j into the backbone
    with method.evaluation():
        method.eval_logits(torch.zeros(1, 1, 8, 8), 2)
        assert all(torch.equal(v, method.models[2][k]) for k, v in trainer.model.backbone.state_dict().items())
    rep = result["method"]
    assert rep["size_task"] == [1.0] * 5 and rep["size_total"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert rep["model_size"] == 5.0
    from export_check import exported_task_il  # the export carries each task's own model
    assert exported_task_il(tmp_path / "run", tmp_path / "m.pt") == R[-1]


def test_class_il_is_refused_in_one_line(tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "sparsecl", "run", "--method", "finetune-per-task", "--benchmark",
                        "digits", "--setting", "class-il", "--epochs", "1", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "task-il" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_presets_load_and_validate():
    from preset_check import check_presets
    check_presets(["seq-mnist-finetune-per-task", "seq-cifar10-jpeg-finetune-per-task"])
