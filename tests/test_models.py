"""Backbones and heads: shapes on the protocols' inputs, exact parameter counts, multi-head routing."""
import pytest
import torch
from torch import nn

from sparsecl import SparseCLError
from sparsecl.models import BACKBONES, ContinualNet, MultiHead, backbone_names, build_model


@pytest.mark.parametrize(
    "name, shape, n_classes",
    [
        ("resnet18", (3, 32, 32), 10),    # seq-cifar10
        ("resnet18", (3, 64, 64), 200),   # seq-tinyimg
        ("resnet18", (3, 84, 84), 100),   # miniImageNet
        ("mlp", (1, 28, 28), 10),         # seq-mnist
        ("mlp", (1, 8, 8), 10),           # embedded digits stand-in
        ("lenet", (3, 32, 32), 100),      # 10-split CIFAR-100 (CL-LSG)
        ("vgg16bn", (3, 32, 32), 100),    # CIFAR-100 superclass (CL-LSG)
        ("vgg-like", (3, 32, 32), 100),   # continual DST
        ("mobilenetv2", (3, 32, 32), 100),
    ],
)
def test_backbone_gives_global_logits(name, shape, n_classes):
    torch.manual_seed(0)
    model = build_model(name, shape, n_classes)
    assert isinstance(model, ContinualNet) and isinstance(model.head, nn.Linear)
    x = torch.randn(2, *shape)
    feats = model.features(x)
    assert feats.shape == (2, model.feature_dim)
    out = model(x)
    assert out.shape == (2, n_classes) and torch.isfinite(out).all()
    assert torch.equal(out, model.head(feats))


def resnet18_params(nf: int, in_ch: int, n_classes: int) -> int:
    """Hand count: bias-free convs, BN = 2 params per channel, 1x1 conv+BN shortcut on shape change."""
    conv = lambda cin, cout, k: cin * cout * k * k  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total = conv(in_ch, nf, 3) + bn(nf)
    cin = nf
    for planes, stride in [(nf, 1), (2 * nf, 2), (4 * nf, 2), (8 * nf, 2)]:
        for s in (stride, 1):
            total += conv(cin, planes, 3) + bn(planes) + conv(planes, planes, 3) + bn(planes)
            if s != 1 or cin != planes:
                total += conv(cin, planes, 1) + bn(planes)
            cin = planes
    return total + 8 * nf * n_classes + n_classes


def test_resnet18_parameter_count():
    model = build_model("resnet18", (3, 32, 32), 10)
    n = sum(p.numel() for p in model.parameters())
    assert n == resnet18_params(64, 3, 10) == 11_173_962  # Mammoth's seq-cifar10 ResNet-18
    small = build_model("resnet18", (3, 32, 32), 10, nf=20)
    assert sum(p.numel() for p in small.parameters()) == resnet18_params(20, 3, 10) == 1_094_750
    assert model.feature_dim == 512 and small.feature_dim == 160
    # No max-pool and a stride-1 3x3 stem: a 32x32 input keeps 32x32 maps in layer1.
    stem = model.backbone.conv1
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.bias is None
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    shortcuts = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(shortcuts) == 3


def test_architecture_details():
    lenet = build_model("lenet", (3, 32, 32), 10)
    convs = [m for m in lenet.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in lenet.backbone.modules() if isinstance(m, nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(20, (5, 5)), (50, (5, 5))]
    assert [(f.in_features, f.out_features) for f in fcs] == [(50 * 8 * 8, 800), (800, 500)]
    for name in ("vgg16bn", "vgg-like"):
        m = build_model(name, (3, 32, 32), 10)
        convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
        assert len(convs) == 13 and sum(isinstance(b, nn.BatchNorm2d) for b in m.modules()) == 13
    like = build_model("vgg-like", (3, 32, 32), 10)
    assert [type(x) for x in like.backbone.fc] == [nn.Linear, nn.ReLU, nn.BatchNorm1d]
    mnv2 = build_model("mobilenetv2", (3, 32, 32), 10)
    assert any(isinstance(c, nn.Conv2d) and c.groups == c.in_channels > 1 for c in mnv2.modules())  # depthwise
    assert mnv2.feature_dim == 1280
    half = build_model("mobilenetv2", (3, 32, 32), 10, width_mult=0.5)
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in mnv2.parameters())
    assert half(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    mlp = build_model("mlp", (1, 8, 8), 5, hidden=[32, 16, 8])
    assert mlp.feature_dim == 8 and [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [32, 16, 8, 5]
    assert build_model("mlp", (1, 28, 28), 10).backbone.net[1].in_features == 784


def test_backbone_names_and_errors():
    names = backbone_names()
    assert set(names) == {"resnet18", "mlp", "lenet", "vgg16bn", "vgg-like", "mobilenetv2"} == set(BACKBONES)
    assert all(desc for desc in names.values())
    with pytest.raises(SparseCLError, match="known: .*resnet18"):
        build_model("resnet50", (3, 32, 32), 10)
    with pytest.raises(SparseCLError, match="no option 'depth'.*nf"):
        build_model("resnet18", (3, 32, 32), 10, depth=34)
    with pytest.raises(SparseCLError, match="bad options"):
        build_model("resnet18", (3, 32, 32), 10, nf="wide")
    with pytest.raises(SparseCLError, match="overlap"):
        build_model("mlp", (1, 8, 8), 4, task_classes=[[0, 1], [1, 2]])
    with pytest.raises(SparseCLError, match=r"\[0, 4\)"):
        build_model("mlp", (1, 8, 8), 4, task_classes=[[0, 1], [2, 4]])


def test_multihead_writes_each_task_into_its_labels():
    torch.manual_seed(0)
    tasks = [[4, 0], [1, 5, 2], [6]]  # non-contiguous, unordered; class 3 belongs to no task
    model = build_model("mlp", (1, 8, 8), 7, task_classes=tasks)
    head = model.head
    assert isinstance(head, MultiHead) and head.n_tasks == 3 and model.multi_head
    x = torch.randn(5, 1, 8, 8)
    out = model(x)
    feats = model.features(x)
    assert out.shape == (5, 7)
    for t, classes in enumerate(tasks):
        assert torch.allclose(out[:, classes], head.heads[t](feats))
    assert torch.equal(out[:, 3], torch.zeros(5))

    # A loss on task 1's logits trains task 1's head only.
    model.zero_grad(set_to_none=True)
    out = model(x)
    out[:, tasks[1]].logsumexp(1).sum().backward()
    assert head.heads[1].weight.grad is not None and head.heads[1].weight.grad.abs().sum() > 0
    for t in (0, 2):
        g = head.heads[t].weight.grad
        assert g is None or torch.count_nonzero(g) == 0
    # The routing index is a non-persistent buffer: not in checkpoints, moves with .to().
    assert "head.index" not in model.state_dict()
    assert model.to(torch.float64)(x.double()).dtype == torch.float64


def test_single_head_state_names():
    model = build_model("resnet18", (3, 32, 32), 10, nf=8)
    names = dict(model.named_parameters())
    assert "head.weight" in names and "backbone.conv1.weight" in names
    assert "backbone.layer2.0.shortcut.0.weight" in names and "backbone.layer1.0.conv1.weight" in names
