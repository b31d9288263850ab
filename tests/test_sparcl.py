"""SparCL (sparcl-er, sparcl-der++): exact mask density outside the documented window, CWI ranking,
DDR's exact removal, DGM's exact gradient density and frozen masked weights, resume, presets, errors."""
from types import SimpleNamespace

import pytest
import torch

from sparsecl.cli import main
from sparsecl.config import build_options, load_preset, preset_names
from sparsecl.config import merge_config
from sparsecl.engine import trainer as trainer_mod
from sparsecl.engine.loggers import RunObserver
from sparsecl.engine.trainer import Trainer, resume, run
from sparsecl.methods import METHODS
from sparsecl.methods.derpp import DERpp
from sparsecl.sparse.allocation import allocate

from interrupt import run_interrupted

LAYERS = ["backbone.net.1.weight", "backbone.net.3.weight"]  # the MLP's hidden layers (conv-linear)


def cfg(method="sparcl-der++", out=None, epochs=4, **opts):
    options = {"lr": 0.05, "buffer_size": 50, "sparsity": 0.75, "delta_k": 0.5, "p_intra": 0.02,
               "p_inter": 0.05, "ddr_rho": 0.3, "ddr_cutoff": 4, "dgm_interval": 7, **opts}
    if method == "sparcl-der++":
        options.update(alpha=0.3, beta=0.5)
    return merge_config(dict(method=method, benchmark="digits", epochs=epochs, batch_size=16, seed=5,
                             device="cpu", method_options=options, out=out))


class CheckedSteps(RunObserver):
    """Checks every step of a sparcl-der++ run: mask counts, zeros, gradient masks."""

    def __init__(self):
        self.method, self.base = None, None  # set once the trainer is built
        self.log = SimpleNamespace(steps=0, window_steps=0, violations=[], grad_checked=0, frozen_checked=0)

    def before_step(self, task):
        m = self.method
        self.params = {n: m.masks.params[n] for n in LAYERS}
        self.before = {n: p.detach().clone() for n, p in self.params.items()}
        self.grad_masks = {n: g.clone() for n, g in m.masks.grad_masks.items()}
        self.stage = m._stage

    def after_step(self, task):
        m, log, stage = self.method, self.log, self.stage
        in_window = task > 0 and stage == 0  # from a later task's start to its first stage end
        log.window_steps += in_window
        for n in LAYERS:
            mask = m.masks.masks[n]
            want = self.base[n] + (round(0.05 * mask.numel()) if in_window and m._stage == 0 else 0)
            if int(mask.sum()) != want or m.masks.active(n) != want:
                log.violations.append(("count", task, n, int(mask.sum()), want))
            if bool((self.params[n][~mask] != 0).any()):
                log.violations.append(("nonzero", task, n))
            if n in self.grad_masks and m._stage == stage:  # no stage end (mask update) in this step
                g = self.grad_masks[n]
                if int(g.sum()) != round(0.2 * g.numel()):  # gradient sparsity 0.80 at s = 0.75
                    log.violations.append(("grad density", task, n, int(g.sum())))
                if not torch.equal(self.params[n][~g], self.before[n][~g]):
                    log.violations.append(("masked weight moved", task, n))
                log.frozen_checked += 1
        log.steps += 1


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """One sparcl-der++ run on digits with every step checked: mask counts, zeros, gradient masks."""
    root = tmp_path_factory.mktemp("sparcl")
    observer = CheckedSteps()
    t = Trainer(cfg(), root / "full", observers=[observer])
    params = dict(t.model.named_parameters())
    observer.method, observer.base = t.method, allocate("uniform", {n: tuple(params[n].shape) for n in LAYERS}, 0.25)
    result = t.run()
    log = observer.log
    return SimpleNamespace(log=log, result=result, root=root)


def test_mask_density_is_exact_outside_the_inter_task_window(checked):
    log = checked.log
    assert log.steps > 300 and log.window_steps > 20
    assert log.violations == []
    sp = checked.result["sparsity"]
    assert sp["overall"]["density"] == pytest.approx(0.25, abs=1e-3)
    tasks = checked.result["method"]["sparcl"]["tasks"]
    assert tasks[0]["density_at_start"] == pytest.approx(0.25, abs=1e-3)
    assert tasks[1]["density_at_start"] > tasks[1]["density_at_end"] == pytest.approx(0.25, abs=1e-3)


def test_dgm_keeps_exact_gradient_density_and_never_updates_a_masked_weight(checked):
    assert checked.log.frozen_checked > 200  # steps x layers with a gradient mask in force
    assert checked.result["sparsity"]["overall"]["grad_density"] == pytest.approx(0.2, abs=1e-3)
    # the memory footprint's gradient term uses the gradient density (SparCL B.2)
    fp = checked.result["memory"]["footprint_bytes"]
    assert fp["gradients"] < fp["weights"]


def test_ddr_removes_exactly_rho_by_the_cutoff_and_only_the_current_tasks_data(tmp_path):
    seen_removed = []
    original = DERpp.observe

    def observe(self, batch):  # what DER++ actually trains on, after SparCL's filtering
        seen_removed.append(int(self._removed[batch.index].sum()))
        return original(self, batch)

    DERpp.observe = observe
    try:
        result, run_dir = run(cfg(epochs=5, delta_k=1, dgm=False), tmp_path / "r")
    finally:
        DERpp.observe = original
    assert sum(seen_removed) == 0  # a removed example is never trained on again
    sizes = result["benchmark"]["train_sizes"]
    tasks = result["method"]["sparcl"]["tasks"]
    for n, t in zip(sizes, tasks):
        assert t["removed_examples"] == round(0.3 * n)
        kept = [s["kept_examples"] for s in t["stages"]]
        assert kept == [n - round(0.3 * n * i / 4) for i in range(1, 5)]  # rho / cutoff per stage end
    # The replay buffer still holds (and replays) earlier tasks' examples: DDR never touches them.
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    tasks_in_buffer = set(ckpt["method"]["buffer"]["store"]["task"][:50].tolist())
    assert {0, 1, 2, 3, 4} <= tasks_in_buffer


def test_cwi_ranks_a_weight_with_buffer_gradient_above_an_equal_weight_without(tmp_path):
    t = Trainer(cfg(dgm=False, ddr=False), tmp_path / "r")
    m = t.method
    m.begin_task(t.stream.tasks[0])
    name = LAYERS[1]
    w, mask = m.masks.params[name], m.masks.masks[name]
    active = torch.nonzero(mask.flatten()).squeeze(1)
    with torch.no_grad():
        w.copy_(mask.float())  # every active weight has |w| = 1
    with_buf = torch.zeros(mask.numel(), dtype=torch.bool)
    with_buf[active[: len(active) // 2]] = True
    with_buf = with_buf.view(mask.shape)
    i = m.mask_names.index(name)
    m._g_buf[i].copy_(with_buf.float() * 5.0)  # a large buffer gradient on half the active weights
    m._n_buf = m._n_cur = 1
    k = round(m.options.p_intra * mask.numel())
    assert 0 < k < len(active) // 2
    m._update_mask()
    # The k dropped weights (now 0, or regrown at 0) all come from the half without buffer gradient.
    assert bool((w[with_buf] == 1).all()) and bool(m.masks.masks[name][with_buf].all())
    assert int((w == 1).sum()) == len(active) - k
    assert m.masks.active(name) == len(active)  # shrink-and-expand keeps the density


@pytest.mark.parametrize("init_scale", ["dense", "fan-in"])  # fan-in: a resume must not scale again
def test_resume_gives_identical_result(tmp_path, init_scale):
    c = cfg("sparcl-er", epochs=3, delta_k=1, ddr_cutoff=1, init_scale=init_scale)
    full, full_dir = run(c, tmp_path / "full")
    run_interrupted(cfg("sparcl-er", epochs=3, delta_k=1, ddr_cutoff=1, init_scale=init_scale), tmp_path / "cut",
                    at_task=2)
    resumed, cut_dir = resume(tmp_path / "cut")
    assert resumed["accuracy"] == full["accuracy"]
    assert resumed["flops"]["train"] == full["flops"]["train"]
    assert resumed["method"] == full["method"]
    a = torch.load(full_dir / "model.pt", weights_only=True)
    b = torch.load(cut_dir / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_importance_costs_no_extra_sample_and_is_reported_as_selection(tmp_path):
    every, _ = run(cfg(ddr=False, importance_every=1), tmp_path / "a")
    rare, _ = run(cfg(ddr=False, importance_every=1000), tmp_path / "b")
    off, _ = run(cfg(tdm=False, ddr=False, dgm=False), tmp_path / "c")
    # the gradients come from the training step's own graph: no extra forward, same training FLOPs
    assert every["samples"]["trained"] == rare["samples"]["trained"] == off["samples"]["trained"]
    assert every["flops"]["train"] == rare["flops"]["train"]
    sel = [r["flops"]["selection"]["flops"] for r in (every, rare, off)]
    assert sel[0] > sel[1] > 0 == sel[2]  # rare: only each stage's first step gathers
    assert every["flops"]["selection"]["share_of_train"] == pytest.approx(sel[0] / every["flops"]["train"])
    assert off["method"]["sparcl"]["components"] == {"tdm": False, "ddr": False, "dgm": False}
    assert off["sparsity"]["overall"]["grad_density"] == pytest.approx(0.25, abs=1e-3)  # no DGM
    assert all(t["removed_examples"] == 0 for t in off["method"]["sparcl"]["tasks"])


@pytest.mark.parametrize("opts, message", [
    ({"momentum": 0.9}, "dgm needs plain SGD"),
    ({"grad_sparsity": 0.5}, "grad_sparsity must lie in [sparsity, 1)"),
    ({"ddr_cutoff": 9}, "ddr_cutoff=9 needs at least 10 stages"),
    ({"delta_k": 4}, "leaves one stage per task"),
    ({"sparsity": 1.0}, "sparsity must lie in [0, 1)"),
    ({"policy": "residual-3x3"}, "selects no layer"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, opts, message):
    args = ["run", "--method", "sparcl-der++", "--benchmark", "digits", "--epochs", "4", "--out", str(tmp_path / "r")]
    for k, v in {"delta_k": 0.5, **opts}.items():
        args += ["-o", f"{k}={v}"]
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_every_preset_loads_and_validates():
    for name in preset_names():
        p = load_preset(name)
        build_options(METHODS.get(p["method"]).options_cls, p.get("method_options", {}), name)
    names = set(preset_names())
    for bench in ("seq-cifar10", "seq-tinyimg"):
        for m in ("er", "der++"):
            for buf in (200, 500):
                for s in (75, 90, 95):
                    assert f"{bench}-sparcl-{m}-{buf}-sp{s}" in names


def test_importance_passes_do_not_inflate_the_activation_memory(tmp_path):
    """SparCL's g_cur / g_buf passes run forward+backward before the DER++ step: the footprint's
    activation term is that of DER++ (its three forwards under one loss), not their sum."""
    from sparsecl.config import merge_config
    from sparsecl.engine.trainer import run

    common = dict(benchmark="digits", epochs=2, batch_size=16, seed=0, device="cpu")
    opts = dict(lr=0.05, buffer_size=50, minibatch_size=16, alpha=0.3, beta=0.5)
    der, _ = run(merge_config(dict(common, method="der++", method_options=opts)), tmp_path / "der")
    sparcl, _ = run(merge_config(dict(common, method="sparcl-der++",
                                      method_options=dict(opts, sparsity=0.75, delta_k=1, ddr=False))), tmp_path / "s")
    assert sparcl["memory"]["footprint_bytes"]["activations"] == der["memory"]["footprint_bytes"]["activations"]


def test_cwi_from_the_steps_graph_equals_cwi_from_separate_passes(tmp_path):
    """g_cur and g_buf taken through the DER++ step's own logits are the gradients that separate
    forward/backward passes of the same batch and buffer minibatch give (same weights)."""
    import torch.nn.functional as F

    t = Trainer(cfg(ddr=False, importance_every=1), tmp_path / "r")
    m = t.method
    task = t.stream.tasks[0]
    m.begin_task(task)
    split = task.train
    first = torch.arange(16)
    m.observe(trainer_mod.Batch(t.augment.train(split.x[first]), split.y[first], split.x[first], first, 0))
    m._reset_importance()
    drawn = []
    original = m.draw
    m.draw = lambda *fields: drawn.append(original(*fields)) or drawn[-1]
    idx = torch.arange(16, 32)
    x, y = t.augment.train(split.x[idx]), split.y[idx]
    before = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    m.observe(trainer_mod.Batch(x, y, split.x[idx], idx, 0))
    assert m._n_cur == m._n_buf == 1 and len(drawn) == 2
    after = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    weights = [m.masks.params[n] for n in m.mask_names]
    t.model.load_state_dict(before)  # the weights the step's forward saw
    g_cur = torch.autograd.grad(F.cross_entropy(m.mask_logits(t.model(x), 0), y), weights)
    x2, y2, _ = drawn[1]  # DER++'s labelled buffer minibatch
    g_buf = torch.autograd.grad(F.cross_entropy(t.model(x2), y2), weights)
    t.model.load_state_dict(after)
    cwi = m._scores(with_weight=True)
    for name, gc, gb in zip(m.mask_names, g_cur, g_buf):
        mask = m.masks.masks[name]  # inactive weights' gradients are neither charged nor kept
        explicit = m.masks.params[name].detach().abs() + (0.5 * gc.abs() + 1.0 * gb.abs()) * mask
        assert torch.allclose(cwi[name], explicit, rtol=1e-5, atol=1e-7)


def test_ddr_removes_only_examples_trained_on_in_the_stage(tmp_path, monkeypatch):
    """Stages of 0.2 epoch (the CPU-budget grid's delta_k) and rho 0.9: each stage visits 20 % of
    the task but should remove 22.5 %; only visited examples go, and batches stay full."""
    from sparsecl.methods.sparcl import SparCL

    events, sizes = [], []
    original = SparCL._remove_data

    def remove(self):
        visited, before = (self._visits > 0).clone(), self._removed.clone()
        k = original(self)
        events.append((k, int(visited.sum()), bool((self._removed & ~before & ~visited).any())))
        return k

    monkeypatch.setattr(SparCL, "_remove_data", remove)
    observe = DERpp.observe
    monkeypatch.setattr(DERpp, "observe", lambda self, batch: sizes.append(batch.y.shape[0]) or observe(self, batch))
    result, _ = run(cfg(epochs=2, delta_k=0.2, ddr_rho=0.9, dgm=False), tmp_path / "r")
    assert len(events) == 5 * 4 and all(k > 0 for k, _, _ in events)
    assert not any(unvisited for _, _, unvisited in events)
    assert all(k <= visited for k, visited, _ in events)
    assert any(k == visited for k, visited, _ in events)  # the cap bites: fewer candidates than rho / cutoff
    # removed data shrinks the number of steps, never the batch: only an epoch's last batch is short
    n_full = sum(s == 16 for s in sizes)
    assert len(sizes) - n_full <= 2 * 5


def test_ddr_mid_epoch_removal_drops_the_rest_of_the_epoch_not_the_batch(tmp_path, monkeypatch):
    """delta_k 1.5: the first removal happens mid-epoch, among examples that may still be ahead in
    that epoch's order; they are never trained on again and every batch but an epoch's last is full."""
    seen_removed, sizes = [], []
    observe = DERpp.observe

    def spy(self, batch):
        seen_removed.append(int(self._removed[batch.index].sum()))
        sizes.append(batch.y.shape[0])
        return observe(self, batch)

    monkeypatch.setattr(DERpp, "observe", spy)
    result, _ = run(cfg(epochs=3, delta_k=1.5, ddr_cutoff=1, dgm=False), tmp_path / "r")
    assert sum(seen_removed) == 0
    tasks = result["method"]["sparcl"]["tasks"]
    assert all(t["removed_examples"] == round(0.3 * n) for t, n in zip(tasks, result["benchmark"]["train_sizes"]))
    assert len(sizes) - sum(s == 16 for s in sizes) <= 3 * 5


def test_ddr_counts_the_current_batch_whatever_order_the_parent_forwards_in(tmp_path):
    """A replay parent that forwards its buffer minibatch before the current batch: DDR still counts
    one visit per current example and its misclassification from the current batch's own logits."""
    from sparsecl.methods.base import StepLoss, StepOutputs, register_method
    from sparsecl.methods.er import ER
    from sparsecl.methods.sparcl import SparCL, SparCLEROptions

    class BufferFirstER(ER):
        def step_loss(self, batch):
            if self.buffer.is_empty:
                return super().step_loss(batch)
            bx, by, bt = self.draw("y", "task")
            replayed, out = self.net(bx), self.net(batch.x)
            self.logits = (replayed.detach(), out.detach())
            step = StepOutputs(batch, out, batch.y.shape[0], replayed, by, bt, bx.shape[0])
            return StepLoss(self.loss(out, batch.y, batch.task_id) + self.loss(replayed, by, bt), step)

    @register_method
    class SparCLBufferFirst(SparCL, BufferFirstER):
        name = "sparcl-buffer-first"
        options_cls = SparCLEROptions

    try:
        t = Trainer(cfg("sparcl-buffer-first", lr=0.1, delta_k=2.0, ddr_cutoff=1), tmp_path / "r")  # no stage end
    finally:
        METHODS.remove("sparcl-buffer-first")
    m, task = t.method, t.stream.tasks[0]
    m.begin_task(task)
    split = task.train

    def step(idx):
        m.observe(trainer_mod.Batch(t.augment.train(split.x[idx]), split.y[idx], split.x[idx], idx, 0))

    step(torch.arange(16))  # fills the buffer
    differs = 0
    for start in range(16, 176, 16):
        m._wrong.zero_()
        m._visits.zero_()
        idx = torch.arange(start, start + 16)
        step(idx)
        replayed, current = ((z.masked_fill(~m._seen, float("-inf")).argmax(1) != split.y[idx]).int() for z in m.logits)
        differs += not torch.equal(replayed, current)
        assert torch.equal(m._visits, torch.isin(torch.arange(len(split)), idx).int())
        assert torch.equal(m._wrong[idx], current) and int(m._wrong.sum()) == int(current.sum())
    assert differs  # on some steps the buffer's logits would have counted other examples wrong
