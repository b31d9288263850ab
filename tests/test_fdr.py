"""FDR: the function-distance penalty to stored outputs, and its per-task memory."""
import pytest
import torch

from sparsecl.config import merge_config
from sparsecl.engine.trainer import Trainer
from sparsecl.methods.fdr import function_distance


def cfg(setting="class-il", **opts):
    options = {"lr": 0.05, "buffer_size": 100}
    options.update(opts)
    return merge_config(dict(method="fdr", benchmark="digits", setting=setting, epochs=1, batch_size=16,
                             seed=0, device="cpu", method_options=options))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    trainer = Trainer(cfg(), tmp_path_factory.mktemp("fdr") / "run")
    result = trainer.run()
    return trainer, result


def test_function_distance_is_zero_at_equal_outputs_and_grows_with_the_gap():
    p = torch.softmax(torch.randn(8, 10, generator=torch.Generator().manual_seed(0)), 1)
    q = torch.softmax(torch.randn(8, 10, generator=torch.Generator().manual_seed(1)), 1)
    assert function_distance(p, p) == 0
    gaps = [function_distance(p, (1 - lam) * p + lam * q) for lam in (0.1, 0.4, 0.7, 1.0)]
    assert all(a < b for a, b in zip(gaps, gaps[1:]))


def test_penalty_is_zero_at_the_stored_outputs_and_grows_when_the_network_moves(trained, tmp_path):
    trainer, _ = trained
    method, model = trainer.method, trainer.model
    x_raw, stored, tasks = method.buffer.data["x"], method.buffer.data["logits"], method.buffer.data["task"]
    last = tasks == 4  # stored at the end of the run: the network has not moved since
    x = method.ctx.augment.eval(x_raw[last])
    model.eval()
    with torch.no_grad():
        assert method.penalty(x, stored[last], tasks[last]) < 1e-6
        start = {k: v.clone() for k, v in model.state_dict().items()}
        values = []
        for scale in (0.05, 0.2, 0.8):  # the same direction, further and further
            g = torch.Generator().manual_seed(3)
            for k, v in model.named_parameters():
                v.copy_(start[k] + scale * torch.randn(v.shape, generator=g))
            values.append(float(method.penalty(x, stored[last], tasks[last])))
        model.load_state_dict(start)
    assert 0 < values[0] < values[1] < values[2]


def test_memory_is_split_evenly_over_the_tasks_with_their_own_examples(trained):
    trainer, result = trained
    mem = trainer.method.buffer.data
    assert mem["task"].bincount().tolist() == [20] * 5  # buffer 100 over 5 tasks
    for t, task in enumerate(trainer.stream.tasks):
        rows = mem["x"][mem["task"] == t]
        train = task.train.x.flatten(1)
        # every stored example is one of its task's training images
        assert all(bool((train == r.flatten()).all(1).any()) for r in rows)
    assert result["flops"]["replayed_samples"] > 0  # the distance steps are counted as replayed samples


def test_task_il_distance_compares_each_example_within_its_own_task(tmp_path):
    trainer = Trainer(cfg("task-il"), tmp_path / "t")
    trainer.run()
    m = trainer.method
    logits = torch.randn(4, 10)
    probs = m.probabilities(logits, torch.tensor([0, 1, 2, 3]))
    for i in range(4):  # probability mass only on the row's task's two classes
        assert probs[i, 2 * i:2 * i + 2].sum() == pytest.approx(1.0)


def test_presets_load_and_validate():
    from preset_check import check_presets
    check_presets([f"{b}-fdr-{n}" for b in ("seq-mnist", "seq-cifar10") for n in (200, 500)])


def test_resume_gives_the_same_result(tmp_path):
    from interrupt import run_interrupted
    from sparsecl.engine.trainer import resume, run

    full, _ = run(cfg(), tmp_path / "full")
    run_interrupted(cfg(), tmp_path / "cut", at_task=2)
    resumed, _ = resume(tmp_path / "cut")
    assert resumed["accuracy"] == full["accuracy"]
