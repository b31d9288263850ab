"""Sparse core: policies, density allocation, masks, drop/grow, ownership, FLOP accounting with masks."""
import io
import math

import pytest
import torch
from torch import nn

from sparsecl import SparseCLError
from sparsecl.engine.trainer import SampleCounter
from sparsecl.metrics.efficiency import model_capacity
from sparsecl.models import build_model
from sparsecl.sparse import (
    FlopCounter, FrozenGuard, MaskPolicy, MaskSet, TaskOwnership, allocate, check_sparsity, cosine_update_fraction,
    drop_and_grow_, drop_lowest, erk_densities, grow, profile_layers, random_mask, topk_mask,
)


def shapes_of(model, names):
    params = dict(model.named_parameters())
    return {n: tuple(params[n].shape) for n in names}


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return build_model("resnet18", (3, 32, 32), 10)


# ----------------------------------------------------------------------------- policies
def test_policies_on_resnet18(resnet):
    conv_linear = MaskPolicy("conv-linear").select(resnet)
    residual = MaskPolicy("residual-3x3").select(resnet)
    blocks = [f"backbone.layer{i}.{j}.conv{k}.weight" for i in range(1, 5) for j in range(2) for k in (1, 2)]
    # On ResNet-18 both presets keep exactly the 16 3x3 convs of the residual blocks.
    assert residual == blocks and conv_linear == blocks
    full = MaskPolicy("conv-linear", include_first=True, include_shortcuts=True, include_head=True).select(resnet)
    assert full[0] == "backbone.conv1.weight" and full[-1] == "head.weight"
    assert sum("shortcut" in n for n in full) == 3 and len(full) == 16 + 1 + 3 + 1


def test_policies_on_mlp_and_vgg():
    mlp = build_model("mlp", (1, 28, 28), 10)
    assert MaskPolicy().select(mlp) == ["backbone.net.1.weight", "backbone.net.3.weight"]  # head dense
    with pytest.raises(SparseCLError, match="selects no layer"):
        MaskPolicy("residual-3x3").select(mlp)
    vgg = build_model("vgg16bn", (3, 32, 32), 10)
    names = MaskPolicy().select(vgg)
    convs = [n for n, m in vgg.named_modules() if isinstance(m, nn.Conv2d)]
    assert f"{convs[0]}.weight" not in names and f"{convs[1]}.weight" in names and "head.weight" not in names
    with pytest.raises(SparseCLError, match="unknown mask policy"):
        MaskPolicy("everything")


# ----------------------------------------------------------------------------- allocation
@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.2, 0.5, 0.8, 0.95, 1.0])
def test_erk_exact_total_and_no_layer_above_one(resnet, density):
    names = MaskPolicy(include_first=True, include_shortcuts=True, include_head=True).select(resnet)
    shapes = shapes_of(resnet, names)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    dens = erk_densities(shapes, density)
    assert all(0 < d <= 1.0 for d in dens.values())
    assert sum(dens[n] * sizes[n] for n in names) == pytest.approx(density * total, rel=1e-9)
    counts = allocate("erk", shapes, density)
    assert sum(counts.values()) == round(density * total)  # exact total
    assert all(0 <= counts[n] <= sizes[n] for n in names)
    # Unsaturated layers follow eps * raw_l (up to the count rounding).
    raw = {n: sum(s) / sizes[n] for n, s in shapes.items()}
    free = [n for n in names if dens[n] < 1.0]
    eps = {dens[n] / raw[n] for n in free} or {1.0}
    assert max(eps) == pytest.approx(min(eps), rel=1e-9)
    assert all(abs(counts[n] - dens[n] * sizes[n]) < 1.0 for n in names)


def test_erk_saturates_small_layers_and_uniform_is_exact_per_layer():
    shapes = {"big": (100, 100), "small": (2, 3), "mid": (10, 20)}
    dens = erk_densities(shapes, 0.3)
    assert dens["small"] == 1.0 and dens["mid"] == 1.0 and dens["big"] < 0.3
    counts = allocate("erk", shapes, 0.3)
    assert sum(counts.values()) == round(0.3 * (10000 + 6 + 200)) and counts["small"] == 6
    assert allocate("uniform", shapes, 0.1) == {"big": 1000, "small": 1, "mid": 20}
    with pytest.raises(SparseCLError):
        allocate("magic", shapes, 0.1)
    for bad in (1.0, 1.5, -0.1, "x"):
        with pytest.raises(SparseCLError, match="sparsity"):
            check_sparsity(bad)


def test_random_and_topk_masks_have_exact_counts():
    g = torch.Generator().manual_seed(0)
    for k in (0, 1, 37, 100):
        assert int(random_mask((10, 10), k, generator=g).sum()) == k
    score = torch.arange(20.0).view(4, 5)
    m = topk_mask(score, 3)
    assert m.view(-1)[17:].all() and int(m.sum()) == 3


# ----------------------------------------------------------------------------- drop and grow
def _setup_layer(seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(20, 10, bias=False)
    masks = MaskSet.from_counts(lin, {"weight": 50})
    masks.apply_()
    return lin, masks


def test_drop_by_magnitude_drops_smallest_active():
    lin, masks = _setup_layer()
    w, m = lin.weight.detach(), masks.masks["weight"]
    kept = drop_lowest(m, w.abs(), 10)
    active_vals = w.abs()[m]
    threshold = active_vals.sort().values[10]
    assert int(kept.sum()) == 40 and bool((kept <= m).all())
    assert bool((w.abs()[m & ~kept] < threshold + 1e-12).all()) and bool((w.abs()[kept] >= threshold).all())


def test_growth_modes_pick_what_they_claim():
    lin, masks = _setup_layer()
    m = masks.masks["weight"]
    inactive = ~m
    g = torch.Generator().manual_seed(1)
    # random: only inactive weights, exact count
    grown, n = grow(m, 30, "random", generator=g)
    assert n == 30 and int(grown.sum()) == 30 and not bool((grown & m).any())
    # gradient: exactly the top |grad| among inactive weights
    grad = torch.randn(10, 20)
    grown, _ = grow(m, 15, "gradient", grad=grad)
    expected = topk_mask(grad.abs().masked_fill(m, -1.0), 15)
    assert torch.equal(grown, expected)
    assert float(grad.abs()[grown].min()) >= float(grad.abs()[inactive & ~grown].max())
    # momentum: the top |optimiser momentum| among inactive weights
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.randn(8, 20)).pow(2).sum().backward()
    opt.step()
    mom = opt.state[lin.weight]["momentum_buffer"]
    grown, _ = grow(m, 15, "momentum", momentum=mom)
    assert torch.equal(grown, topk_mask(mom.abs().masked_fill(m, -1.0), 15))
    # unfired: never picks a weight that was ever active
    ever = masks.ever_active["weight"].clone()
    ever |= random_mask((10, 20), 100, generator=g)  # pretend more weights were active before
    never = ~ever
    n_never = int(never.sum())
    grown, n = grow(m, n_never - 3, "unfired", ever_active=ever, generator=g)
    assert n == n_never - 3 and not bool((grown & ever).any())
    # ...and when too few never-active weights remain, all of them plus random inactive ones
    grown, n = grow(m, n_never + 5, "unfired", ever_active=ever, generator=g)
    assert n == n_never + 5 and bool((grown >= never).all()) and not bool((grown & m).any())
    # restricted candidates (e.g. free weights only): never outside, fewer if not enough
    allowed = random_mask((10, 20), 40, generator=g)
    grown, n = grow(m, 500, "random", allowed=allowed, generator=g)
    assert n == int((allowed & ~m).sum()) and bool((grown <= (allowed & ~m)).all())
    with pytest.raises(SparseCLError, match="unknown growth mode"):
        grow(m, 1, "psychic")


def test_drop_and_grow_keeps_counts_zeroes_new_weights_and_their_state():
    lin, masks = _setup_layer()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    masks.hook_optimizer(opt)
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(8, 20)).pow(2).sum().backward()
        opt.step()
    before = masks.masks["weight"].clone()
    n = drop_and_grow_(masks, "weight", 12, "gradient", optimizer=opt)
    after = masks.masks["weight"]
    assert n == 12 and int(after.sum()) == 50 == masks.active("weight")
    grown = after & ~before
    assert int(grown.sum()) <= 12 and bool((lin.weight[grown] == 0).all())
    assert bool((opt.state[lin.weight]["momentum_buffer"][grown] == 0).all())
    assert bool((lin.weight[~after] == 0).all())
    assert bool((masks.ever_active["weight"] >= (before | after)).all())
    for mode in ("random", "unfired", "momentum"):
        drop_and_grow_(masks, "weight", 7, mode, optimizer=opt)
        assert int(masks.masks["weight"].sum()) == 50


def test_cosine_update_fraction():
    assert cosine_update_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_update_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert cosine_update_fraction(100, 0.3, 100) == 0.0 == cosine_update_fraction(150, 0.3, 100)


# ----------------------------------------------------------------------------- masks through training
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=1e-1),
])
@pytest.mark.parametrize("mask_grads", [False, True])
def test_masked_weights_stay_zero_through_optimizer_steps(make_opt, mask_grads):
    net = _net()
    masks = MaskSet.from_counts(net, {"0.weight": 10, "2.weight": 9}, mask_grads=mask_grads)
    masks.apply_()
    opt = make_opt(net.parameters())
    masks.hook_optimizer(opt)
    for _ in range(20):
        opt.zero_grad()
        net(torch.randn(5, 6)).pow(2).mean().backward()
        opt.step()
    for name, m in masks.items():
        w = dict(net.named_parameters())[name]
        assert bool((w[~m] == 0).all()) and int((w != 0).sum()) == int(m.sum())
    if mask_grads:  # optimiser state never saw the inactive weights
        st = opt.state[net[0].weight]
        buf = st.get("momentum_buffer", st.get("exp_avg"))
        assert bool((buf[~masks.masks["0.weight"]] == 0).all())


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-2),
    lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
])
def test_frozen_weights_bit_identical_through_many_steps(make_opt):
    net = _net()
    own = TaskOwnership(net, ["0.weight", "2.weight"])
    g = torch.Generator().manual_seed(0)
    counts = {"0.weight": 20, "2.weight": 12}
    params = dict(net.named_parameters())
    task0 = {n: random_mask(params[n].shape, k, generator=g) for n, k in counts.items()}
    own.assign_all_(task0, 0)
    task1 = {n: topk_mask(torch.rand(params[n].shape, generator=g).masked_fill(~own.free(n), -1.0), k)
             for n, k in counts.items()}  # among free weights
    assert all(not bool((task1[n] & task0[n]).any()) for n in task0)
    frozen = own.frozen_masks(1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = make_opt(net.parameters())
    # Warm the optimiser state with a step on everything first (momentum/moments non-zero).
    net(torch.randn(5, 6)).pow(2).mean().backward()
    guard = FrozenGuard(net, frozen)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    guard.hook_optimizer(opt)
    for _ in range(50):
        opt.zero_grad()
        net(torch.randn(5, 6)).pow(2).mean().backward()
        opt.step()
    for n, m in frozen.items():
        w = dict(net.named_parameters())[n]
        assert torch.equal(w[m].view(torch.int32), before[n][m].view(torch.int32))  # bit-identical
        assert not torch.equal(w[~m], before[n][~m])  # the rest did train
    assert own.task_mask_bytes() == 1 * (math.ceil(48 / 8) + math.ceil(32 / 8))
    assert 0 < own.used_fraction() < 1


def test_frozen_guard_keeps_values_from_a_store_and_follows_set_frozen():
    """A guard given ``values`` writes the store's values into the frozen positions (e.g. weights
    the live parameter had masked out) and follows ``set_frozen_``."""
    net = _net()
    w = net[0].weight
    store = torch.randn_like(w)
    frozen = torch.zeros_like(w, dtype=torch.bool)
    frozen[0] = True
    guard = FrozenGuard(net, {"0.weight": frozen}, values={"0.weight": store})
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    guard.hook_optimizer(opt)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 6)).pow(2).mean().backward()
        opt.step()
    assert torch.equal(w[0], store[0]) and not torch.equal(w[1], store[1])
    frozen2 = torch.zeros_like(frozen)
    frozen2[1] = True
    guard.set_frozen_("0.weight", frozen2)
    opt.zero_grad()
    net(torch.randn(5, 6)).pow(2).mean().backward()
    opt.step()
    assert torch.equal(w[1], store[1]) and not torch.equal(w[0], store[0])


def test_ownership_queries_and_state():
    net = _net()
    own = TaskOwnership(net, ["0.weight"])
    m0 = random_mask((8, 6), 10, generator=torch.Generator().manual_seed(0))
    own.assign_("0.weight", m0, 0)
    assert torch.equal(own.owned("0.weight", 0), m0) and torch.equal(own.free("0.weight"), ~m0)
    with pytest.raises(SparseCLError, match="owned by another task"):
        own.assign_("0.weight", m0, 1)
    m1 = random_mask((8, 6), 5, generator=torch.Generator().manual_seed(1)) & ~m0
    own.assign_("0.weight", m1, 1)
    assert torch.equal(own.owned("0.weight", upto=1), m0 | m1) and torch.equal(own.owned("0.weight", upto=0), m0)
    other = TaskOwnership(net, ["0.weight"])
    buf = io.BytesIO()
    torch.save(own.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other.owner["0.weight"], own.owner["0.weight"]) and other.n_tasks == 2


def test_maskset_state_roundtrip_bytes_and_errors():
    net = _net()
    masks = MaskSet.from_counts(net, {"0.weight": 10, "2.weight": 9})
    masks.set_grad_mask("0.weight", masks.masks["0.weight"] & (torch.rand(8, 6) < 2))  # == weight mask
    buf = io.BytesIO()
    torch.save(masks.state_dict(), buf)
    buf.seek(0)
    other = MaskSet.from_counts(net, {"0.weight": 1, "2.weight": 1})
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.equal(other.masks[n], masks.masks[n]) for n in masks.names)
    assert other.active() == 19 and other.grad_active("0.weight") == 10
    assert masks.mask_bytes() == math.ceil(48 / 8) + math.ceil(32 / 8)
    with pytest.raises(ValueError, match="shape"):
        masks.set_mask("0.weight", torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(KeyError):
        MaskSet(net, {"nope": torch.ones(1, dtype=torch.bool)})


# ----------------------------------------------------------------------------- FLOPs with masks
def test_flop_counter_with_masks_equals_hand_count():
    """Two-layer net 4-3-2: dense forward 2*(12+6) = 36 FLOPs/sample, training 108."""
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    fc = FlopCounter(profile_layers(net, (4,)))
    counter = SampleCounter(net, fc)
    counter.active = True

    def train(n):  # n real samples through forward + backward
        net(torch.randn(n, 4)).sum().backward()

    full = lambda: {n: torch.ones_like(p, dtype=torch.bool) for n, p in net.named_parameters() if n.endswith("weight")}  # noqa: E731
    masks = MaskSet(net, full())
    masks.bind_flops(fc)
    train(10)  # density 1
    assert fc.total == 10 * 108
    # density 0.5 in both layers: exactly 6 of 12 and 3 of 6 weights
    masks.set_mask("0.weight", topk_mask(torch.arange(12.0).view(3, 4), 6))
    masks.set_mask("2.weight", topk_mask(torch.arange(6.0).view(2, 3), 3))
    train(10)
    assert fc.total == pytest.approx(10 * 108 + 10 * 54)
    # half of layer 0's active weights get no gradient (weight-grad density 0.25), layer 2 keeps 1 of 6
    masks.set_grad_mask("0.weight", topk_mask(torch.arange(12.0).view(3, 4), 3))
    masks.set_grad_mask("2.weight", topk_mask(torch.arange(6.0).view(2, 3), 1))
    assert masks.grad_density("0.weight") == 0.25 and masks.grad_active("2.weight") == 1
    train(10)
    per_sample = 2 * 12 * (0.5 + 0.5 + 0.25) + 2 * 6 * (0.5 + 0.5 + 1 / 6)
    assert fc.total == pytest.approx(10 * 108 + 10 * 54 + 10 * per_sample)
    # half of the samples skipped (e.g. removed data): only the processed half is charged
    before = fc.total
    train(5)
    assert fc.total - before == pytest.approx(5 * per_sample)
    assert fc.dense_total == 35 * 108 and counter.train_samples == 35
    masks.clear_grad_masks()
    assert fc.density("0.weight") == (0.5, 0.5)


def test_capacity_formula():
    assert model_capacity(0.9, 0) == pytest.approx(0.1)
    assert model_capacity(0.9, 5, gamma=0.75) == pytest.approx(0.1 + 0.25 * 5 / 32)
