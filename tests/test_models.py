"""Every backbone in the registry trains: forward, backward, a gradient for every parameter."""

import pytest
import torch
import torchvision

from simclr_cli.loss import nt_xent
from simclr_cli.models import BACKBONES, ProjectionHead, SimCLR, build_backbone
from simclr_cli.optim import build_optimizer

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_every_backbone_forward_backward_reaches_every_parameter(arch):
    torch.manual_seed(0)
    model = SimCLR(arch, "imagenet", proj_layers=2)
    projections = model(torch.randn(4, 3, 32, 32))
    assert projections.shape == (4, 128)
    projections.square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert model.backbone.feature_dim == FEATURE_DIMS[arch]


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_our_resnet_is_torchvisions_key_for_key_and_output_for_output(arch):
    """Encoders are rebuilt without torchvision (2 s faster to start); files must still load both ways."""
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)()
    reference.fc = torch.nn.Identity()
    ours = build_backbone(arch, "imagenet")
    ours_state = ours.state_dict()
    assert {k: v.shape for k, v in ours_state.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    ours.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 64, 64)
    assert torch.allclose(ours.eval()(images), reference.eval()(images), atol=1e-5)
    # torchvision's initialisation: He-normal (fan out) convolutions, unit BatchNorm scales.
    conv = ours_state["layer2.0.conv1.weight"]
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert conv.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
    assert torch.equal(ours_state["bn1.weight"], torch.ones(64))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_zero_init_residual_starts_every_block_as_its_shortcut(arch):
    ours = build_backbone(arch, "imagenet", zero_init_residual=True)
    reference = getattr(torchvision.models, arch)(zero_init_residual=True)
    zeroed = {key for key, value in ours.state_dict().items() if key.endswith(".weight") and not value.any()}
    assert zeroed == {key for key, value in reference.state_dict().items()
                      if key.endswith(".weight") and not value.any()}, "the BatchNorms torchvision zeroes"
    assert len(zeroed) == sum(len(getattr(ours, f"layer{i}")) for i in range(1, 5)), "one per block"
    ours.train()
    x = torch.randn(4, ours.layer1[0].conv1.in_channels, 8, 8)
    for block in ours.layer1:  # a block whose branch adds zero gives relu(shortcut)
        shortcut = x if block.downsample is None else block.downsample(x)
        assert torch.equal(block(x), torch.relu(shortcut))
        x = block(x)
    default = build_backbone(arch, "imagenet").state_dict()
    assert not [key for key in zeroed if not default[key].any()], "build_backbone's default: unit scales"


def test_cifar_stem_keeps_resolution_and_torchvision_key_names():
    backbone = build_backbone("resnet18", "cifar")
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, torch.nn.Identity)
    reference_keys = set(torchvision.models.resnet18().state_dict()) - {"fc.weight", "fc.bias"}
    assert set(backbone.state_dict()) == reference_keys
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 512)


@pytest.mark.parametrize("arch,stem,width", [("resnet18", "imagenet", 0.5), ("resnet18", "cifar", 2),
                                              ("resnet50", "imagenet", 0.25)])
def test_width_scales_every_convolution_but_the_image_input(arch, stem, width):
    standard, scaled = build_backbone(arch, stem).state_dict(), build_backbone(arch, stem, width=width)
    assert set(scaled.state_dict()) == set(standard), "torchvision's key names at any width"
    for key, tensor in scaled.state_dict().items():
        reference = standard[key]
        if tensor.ndim == 4:  # a convolution (out, in, kh, kw): every width scaled except the RGB input
            assert tensor.shape[0] == round(reference.shape[0] * width), key
            inputs = 3 if key == "conv1.weight" else round(reference.shape[1] * width)
            assert tensor.shape[1:] == (inputs, *reference.shape[2:]), key
    assert scaled.feature_dim == FEATURE_DIMS[arch] * width
    assert scaled(torch.randn(2, 3, 32, 32)).shape == (2, FEATURE_DIMS[arch] * width)


@pytest.mark.parametrize("layers", [2, 3])
def test_projection_head_depth(layers):
    head = ProjectionHead(512, out_dim=128, layers=layers)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    relus = [m for m in head.modules() if isinstance(m, torch.nn.ReLU)]
    assert len(linears) == layers and len(norms) == layers - 1 and len(relus) == layers - 1
    assert linears[-1].out_features == 128
    assert head(torch.randn(4, 512)).shape == (4, 128)


@pytest.mark.parametrize("layers", [2, 3])
def test_projection_output_batchnorm_learns_a_scale_and_no_shift_as_the_reference_head(layers):
    """google-research/simclr's last head layer: a Dense layer without bias, then BatchNorm with
    center=False. Checked against that formula written out, then through LARS steps of NT-Xent."""
    torch.manual_seed(0)
    head = ProjectionHead(16, out_dim=8, layers=layers, out_bn=True).train()
    *hidden, linear, norm = head.layers
    assert linear.bias is None and isinstance(norm, torch.nn.BatchNorm1d)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(32, 16)
    pre = torch.nn.Sequential(*hidden)(x) @ linear.weight.T  # (32, 8)
    expected = (pre - pre.mean(0)) / torch.sqrt(pre.var(0, unbiased=False) + norm.eps) * norm.weight
    torch.testing.assert_close(head(x), expected)

    scale = norm.weight.detach().clone()
    optimizer = build_optimizer("lars", head, 0.5, 1e-6)
    for _ in range(3):
        z = head(x[:16].repeat(2, 1) + 0.1 * torch.randn_like(x))  # two noisy views of 16 inputs
        loss = nt_xent(z[:16], z[16:], 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(norm.weight, scale), "the scale learns"
    assert not norm.bias.any(), "the shift stays 0"
