"""FLOP accounting and memory formula against hand counts."""
import json

import pytest
import torch
from torch import nn

from sparsecl.metrics.efficiency import memory_footprint, peak_memory_bytes, reset_peak_memory
from sparsecl.models import build_model
from sparsecl.sparse.flops import FlopCounter, LayerProfile, profile_layers


def two_layer() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_profile_two_layer_net():
    layers = profile_layers(two_layer(), (4,))
    assert layers == [
        LayerProfile(name="0", kind="linear", weight="0.weight", macs=12, out_numel=3, n_weights=12),
        LayerProfile(name="2", kind="linear", weight="2.weight", macs=6, out_numel=2, n_weights=6),
    ]


def test_flop_counter_hand_counts():
    fc = FlopCounter(profile_layers(two_layer(), (4,)))
    # Dense: forward 2*(12+6) = 36 FLOPs per sample; training = 3x forward = 108.
    fc.train_samples(10)
    assert fc.total == fc.dense_total == 1080 and fc.ratio == 1.0
    fc.forward_samples(5)
    assert fc.total == fc.dense_total == 1080 + 180

    # Density 0.5 everywhere: every term halves.
    fc = FlopCounter(profile_layers(two_layer(), (4,)))
    fc.set_density("0.weight", 0.5)
    fc.set_density("2.weight", 0.5)
    fc.train_samples(10)
    fc.forward_samples(5)
    assert fc.total == pytest.approx(540 + 90) and fc.dense_total == 1260
    assert fc.ratio == pytest.approx(0.5)

    # Dense weights, half of the weight gradients masked: fwd 36 + input-grad 36 + weight-grad 18.
    fc = FlopCounter(profile_layers(two_layer(), (4,)))
    fc.set_density("0.weight", 1.0, grad=0.5)
    fc.set_density("2.weight", 1.0, grad=0.5)
    fc.train_samples(1)
    assert fc.total == pytest.approx(90) and fc.dense_total == 108
    fc.forward_samples(1)  # forward-only samples do not depend on the gradient mask
    assert fc.total == pytest.approx(126)

    # Only layer 0 sparse (w 0.25, g 0.5): layer 0 = 2*12*(0.25 + 0.25 + 0.5) = 24, layer 2 = 36.
    fc = FlopCounter(profile_layers(two_layer(), (4,)))
    fc.set_density("0.weight", 0.25, grad=0.5)
    fc.train_samples(2)
    per = fc.per_layer()
    assert per["0.weight"]["flops"] == pytest.approx(48) and per["2.weight"]["flops"] == pytest.approx(72)
    assert per["0.weight"]["dense_flops"] == 144 and per["0.weight"]["weight_density"] == 0.25


def test_skipped_samples_and_density_changes_are_step_by_step():
    full, half = (FlopCounter(profile_layers(two_layer(), (4,))) for _ in range(2))
    full.train_samples(10)
    half.train_samples(5)  # half of the data removed: only processed samples count
    assert half.total * 2 == full.total and half.dense_total * 2 == full.dense_total

    fc = FlopCounter(profile_layers(two_layer(), (4,)))
    fc.train_samples(4)                 # 4 dense samples: 4 * 108
    fc.set_density("0.weight", 0.5)     # then layer 0 at half density: 108 - 0.5 * 72 = 72 each
    fc.train_samples(6)
    assert fc.total == pytest.approx(4 * 108 + 6 * 72) and fc.dense_total == 10 * 108
    assert fc.n_train_samples == 10


def test_flop_counter_state_roundtrip_and_errors():
    layers = profile_layers(two_layer(), (4,))
    fc = FlopCounter(layers)
    fc.set_density("2.weight", 0.5, grad=0.25)
    fc.train_samples(3)
    state = json.loads(json.dumps(fc.state_dict()))  # plain numbers only
    other = FlopCounter(layers)
    other.load_state_dict(state)
    assert other.total == fc.total and other.density("2.weight") == (0.5, 0.25)
    fc.train_samples(2)
    other.train_samples(2)
    assert other.total == fc.total and other.dense_total == fc.dense_total
    with pytest.raises(KeyError, match="nope.weight"):
        fc.set_density("nope.weight", 0.5)
    with pytest.raises(ValueError):
        fc.set_density("0.weight", 1.5)
    with pytest.raises(ValueError, match="different set of layers"):
        FlopCounter(layers[:1]).load_state_dict(state)


def test_conv_hand_counts_including_depthwise_and_groups():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),                # 8x5x5 out, 3*9 MACs each
        nn.Conv2d(8, 8, 3, padding=1, groups=8),      # depthwise: 1*9 MACs per output
        nn.Conv2d(8, 4, 1, groups=2),                 # grouped pointwise: 4 MACs per output
        nn.Conv2d(4, 6, (1, 3), stride=2, padding=(0, 1)),  # 6x3x3 out, 4*3 MACs each
        nn.Flatten(),
        nn.Linear(54, 7),
    )
    layers = profile_layers(net, (3, 5, 5))
    assert [(p.kind, p.macs, p.out_numel, p.n_weights) for p in layers] == [
        ("conv", 200 * 27, 200, 216),
        ("conv", 200 * 9, 200, 72),
        ("conv", 100 * 4, 100, 16),
        ("conv", 54 * 12, 54, 72),
        ("linear", 7 * 54, 7, 378),
    ]


def test_resnet18_macs_by_hand():
    model = build_model("resnet18", (3, 32, 32), 10)
    layers = profile_layers(model, (3, 32, 32))
    conv = lambda hw, cin, cout, k: hw * hw * cin * cout * k * k  # noqa: E731
    expected = conv(32, 3, 64, 3) + 4 * conv(32, 64, 64, 3)
    for hw, cin, c in [(16, 64, 128), (8, 128, 256), (4, 256, 512)]:
        expected += conv(hw, cin, c, 3) + 3 * conv(hw, c, c, 3) + conv(hw, cin, c, 1)
    expected += 512 * 10
    assert sum(p.macs for p in layers) == expected == 555_422_720
    assert layers[0].weight == "backbone.conv1.weight" and layers[-1].weight == "head.weight"
    params = dict(model.named_parameters())
    assert all(params[p.weight].numel() == p.n_weights for p in layers)


def test_profile_layers_restores_modes_and_removes_hooks():
    model = build_model("vgg-like", (3, 32, 32), 10)  # BatchNorm1d: needs eval mode for a batch of 1
    model.train()
    model.backbone.fc[2].eval()  # e.g. a frozen BN must stay frozen
    before = {n: m.training for n, m in model.named_modules()}
    layers = profile_layers(model, (3, 32, 32))
    assert {n: m.training for n, m in model.named_modules()} == before
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    profile_layers(model, (3, 32, 32))
    assert not any(m.training for m in model.modules())
    assert len(layers) == 13 + 2


def test_memory_footprint_hand_example():
    net = two_layer()  # N = 12 + 3 + 6 + 2 = 23 parameters
    layers = profile_layers(net, (4,))
    with torch.no_grad():
        net[0].weight.view(-1)[:4] = 0  # 19 nonzeros
        net[0].bias.fill_(1.0)
        net[2].bias.fill_(1.0)
    fp = memory_footprint(layers, net, 8)
    assert fp["activations"] == 2 * 8 * (3 + 2) * 4 == 320
    assert fp["weights"] == fp["gradients"] == 19 * 4
    assert fp["masks"] == fp["buffer"] == 0 and fp["total"] == 320 + 2 * 76
    fp = memory_footprint(layers, net, 8, weight_density=0.25, grad_density=0.1, mask_bytes=10, buffer_bytes=100)
    assert fp["weights"] == 23 and fp["gradients"] == 9  # 0.25*23*4, round(0.1*23*4 = 9.2)
    assert fp["total"] == 320 + 23 + 9 + 10 + 100


def test_peak_memory_cpu():
    reset_peak_memory("cpu")
    peak = peak_memory_bytes(torch.device("cpu"))
    assert isinstance(peak, int) and peak > 0


def test_memory_batch_counts_samples_whose_activations_live_together():
    """The footprint's B: DER++'s forwards under one loss add up, SAM-like sequential passes
    (forward, backward, forward, backward) and autograd.grad passes count as their largest."""
    from sparsecl.engine.trainer import SampleCounter

    net = two_layer()
    counter = SampleCounter(net, FlopCounter(profile_layers(net, (4,))))
    counter.active = True
    x = torch.randn(8, 4)

    counter.new_step()
    (net(x).sum() + net(x[:4]).sum() + net(x).sum()).backward()  # one graph: 20 samples alive
    assert counter.step_samples == 20

    counter.new_step()
    net(x).sum().backward()
    net(x).sum().backward()  # the first graph is freed before the second forward
    assert counter.step_samples == 8

    counter.new_step()
    torch.autograd.grad(net(x[:4]).sum(), list(net.parameters()))
    net(x).sum().backward()
    assert counter.step_samples == 8
    with torch.no_grad():
        net(torch.randn(100, 4))  # forward-only passes hold no activations for a backward
    assert counter.step_samples == 8 and counter.train_samples == 20 + 16 + 12
