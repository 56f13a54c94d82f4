"""Tests of elim.models: backbone shapes, dropout at eval, projector size."""

from __future__ import annotations

import pytest
import torch
from elim.models import (
    AlexNetEncoder,
    MixerEncoder,
    Projector,
    ResNet18Encoder,
    build_encoder,
)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_projector_has_88322_parameters_at_d64():
    assert _n_params(Projector(64)) == 88_322


def test_projector_shape_and_unbounded_output():
    proj = Projector(8).eval()
    with torch.no_grad():
        proj.net[-1].bias.fill_(5.0)  # no tanh/clamp: the bias must show up as it is
        proj.net[-1].weight.zero_()
        out = proj(torch.randn(3, 8))
    assert out.shape == (3, 2)
    torch.testing.assert_close(out, torch.full((3, 2), 5.0))
    with pytest.raises(ValueError, match="z"):
        proj(torch.randn(3, 7))


@pytest.mark.parametrize(
    ("name", "cls"),
    [("alexnet", AlexNetEncoder), ("resnet18", ResNet18Encoder), ("mixer", MixerEncoder)],
)
def test_backbone_forward_64px(name, cls):
    torch.manual_seed(0)
    enc = build_encoder(name, feature_dim=16, image_size=64)
    assert isinstance(enc, cls)
    x = torch.randn(2, 3, 64, 64)
    enc.train()
    out = enc(x)
    assert out.shape == (2, 16) and torch.isfinite(out).all()
    out.sum().backward()  # trainable end to end
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)
    enc.eval()
    with torch.no_grad():
        assert enc(x[:1]).shape == (1, 16)


def test_resnet_head_dropout_off_in_eval():
    torch.manual_seed(0)
    enc = ResNet18Encoder(feature_dim=8)
    x = torch.randn(4, 3, 64, 64)
    enc.eval()
    with torch.no_grad():
        assert torch.equal(enc(x), enc(x))
        enc.train()
        assert not torch.equal(enc(x), enc(x))  # dropout active while training


def test_alexnet_accepts_63px_and_rejects_smaller():
    enc = AlexNetEncoder(feature_dim=4).eval()
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 63, 63)).shape == (1, 4)
    with pytest.raises(ValueError, match="image_size"):
        build_encoder("alexnet", feature_dim=4, image_size=62)


def test_build_encoder_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="name"):
        build_encoder("vgg", feature_dim=4)
    with pytest.raises(ValueError, match="feature_dim"):
        build_encoder("resnet18", feature_dim=0)
    with pytest.raises(ValueError, match="image_size"):
        MixerEncoder(feature_dim=4, image_size=60)
    with pytest.raises(FileNotFoundError, match="pretrained_path"):
        build_encoder("resnet18", 4, pretrained_path=tmp_path / "missing.pt")


def test_pretrained_path_loads_local_weights(tmp_path):
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    with torch.no_grad():
        net.conv1.weight.fill_(0.123)
    path = tmp_path / "r18.pt"
    torch.save(net.state_dict(), path)
    enc = build_encoder("resnet18", feature_dim=4, pretrained_path=path)
    assert torch.equal(enc.backbone.conv1.weight, net.conv1.weight)
