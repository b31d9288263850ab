"""Reserve channels past the designed network (sparse.capacity) and their gated execution."""
import math

import pytest
import torch

from sparsecl.models import build_model
from sparsecl.sparse.capacity import backbone_weights, narrow, widen_
from sparsecl.sparse.gates import GateSet

BACKBONES = [("mlp", (1, 28, 28), {}), ("lenet", (3, 32, 32), {}), ("resnet18", (3, 32, 32), {"nf": 4})]


def _model(backbone, shape, kw):
    torch.manual_seed(0)
    return build_model(backbone, shape, 10, task_classes=[[0, 1], [2, 3]], **kw)


@pytest.mark.parametrize("backbone,shape,kw", BACKBONES)
def test_widening_appends_a_reserve_and_keeps_the_designed_network(backbone, shape, kw):
    model, plain = _model(backbone, shape, kw), _model(backbone, shape, kw)
    rng = torch.get_rng_state()
    widen_(model, 1.5, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's later draws are unchanged
    params, designed = dict(model.named_parameters()), dict(plain.named_parameters())
    for n in backbone_weights(model):
        assert params[n].shape[0] == math.ceil(1.5 * designed[n].shape[0])
        assert torch.equal(params[n][: designed[n].shape[0], : designed[n].shape[1]], designed[n])
    assert model.allocation == {n[:-7]: designed[n].shape[0] for n in backbone_weights(plain)}
    back = narrow(model).state_dict()
    assert back.keys() == plain.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in plain.state_dict().items())


def _gated(model, seed=0):
    names = backbone_weights(model)
    gates = GateSet(model, names, torch.Generator().manual_seed(seed), designed=model.allocation)
    for g in gates.groups:  # a seed network: some designed channels open, others learning
        gate = gates.channel_gate(g)
        gate.on[: max(1, gates.designed[g] // 2)] = True
        gate.learn[gates.designed[g] // 2: gates.designed[g]] = True
        gate.s.data.fill_(0.3)
    for n in names:
        k = gates.kernel_gate(n)
        k.configure_(torch.ones_like(k.learn), torch.ones_like(k.value))
    gates.refresh_active()
    return gates


@pytest.mark.parametrize("backbone,shape,kw", BACKBONES)
def test_a_closed_reserve_is_not_computed_and_changes_no_bit(backbone, shape, kw):
    model, plain = _model(backbone, shape, kw), _model(backbone, shape, kw)
    widen_(model, 1.5, seed=1)
    gates, plain_gates = _gated(model), _gated(plain)
    assert all(gates.active[g] == gates.designed[g] < gates.width[g] for g in gates.groups)
    x = torch.randn(6, *shape)
    out, ref = model(x), plain(x)  # training mode: the kernel gates draw their noise
    assert torch.equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    params, designed = dict(model.named_parameters()), dict(plain.named_parameters())
    for n in backbone_weights(model):
        rows, cols = designed[n].shape[:2]
        assert torch.equal(params[n].grad[:rows, :cols], designed[n].grad)
        assert not params[n].grad[rows:].any()
    assert torch.equal(gates.kernel_gate(n).score.grad[:rows, :cols], plain_gates.kernel_gate(n).score.grad)
    # the FLOP counter's share: the designed part of each widened weight
    dens = gates.densities()
    for n in backbone_weights(model):
        assert dens[n] == pytest.approx(designed[n][:, :, ...].numel() / params[n].numel())


def test_an_open_reserve_channel_is_computed():
    model = _model("mlp", (1, 28, 28), {})
    widen_(model, 1.5, seed=1)
    gates = _gated(model)
    g = gates.groups[0]
    gate = gates.channel_gate(g)
    gate.on[gates.designed[g]] = True  # one reserve channel of the first layer opens
    gates.refresh_active()
    assert gates.active[g] == gates.width[g]
    first = dict(model.named_modules())[g]
    h = {}
    first.register_forward_hook(lambda m, a, y: h.setdefault("y", y))
    model.eval()
    gates.train(False)
    model(torch.randn(4, 1, 28, 28))
    assert h["y"][:, gates.designed[g]].abs().sum() > 0  # its output is there, the next layer reads it


def test_a_single_head_model_widens_and_narrows_back():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10)  # one Class-IL head
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    widen_(model, 2.0, seed=0)
    assert model.head.in_features == model.feature_dim == 200
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    back = narrow(model).state_dict()
    assert all(torch.equal(back[k], v) for k, v in plain.items())


def test_widening_is_refused_below_the_designed_width_and_twice():
    from sparsecl import SparseCLError

    model = _model("mlp", (1, 28, 28), {})
    with pytest.raises(SparseCLError, match="at least"):
        widen_(model, 0.5, seed=0)
    widen_(model, 1.5, seed=0)
    with pytest.raises(SparseCLError, match="widened already"):
        widen_(model, 1.5, seed=0)
