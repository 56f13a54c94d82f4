"""Backbones ``f_phi`` and projector ``f_theta`` of ELIM.

Each encoder maps images ``(B, 3, H, W)`` to features ``(B, D)``; the projector maps
features to valence/arousal ``(B, 2)``. Inference is ``projector(encoder(x))``; identity
matching only happens during training.

Nothing is ever downloaded: backbones start from random weights unless
``pretrained_path`` names a local ``state_dict`` file of the underlying torchvision/timm
network (for example ImageNet weights saved beforehand with ``torch.save``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from .attention import ELIMAttention

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = [
    "ENCODER_NAMES",
    "AlexNetEncoder",
    "ELIMModel",
    "MixerEncoder",
    "Optimizers",
    "Projector",
    "ResNet18Encoder",
    "SmallCNNEncoder",
    "build_encoder",
    "build_model",
    "build_optimizers",
    "frozen_bn_stats",
]

ENCODER_NAMES = ("cnn", "alexnet", "resnet18", "mixer")
EncoderName = Literal["cnn", "alexnet", "resnet18", "mixer"]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value


def _load_local_weights(module: nn.Module, pretrained_path: str | os.PathLike | None) -> None:
    """Load a local state_dict into ``module`` strictly; never downloads anything."""
    if pretrained_path is None:
        return
    if not os.path.isfile(pretrained_path):
        raise FileNotFoundError(
            f"`pretrained_path` must be an existing state_dict file, got {str(pretrained_path)!r}"
        )
    state = torch.load(pretrained_path, map_location="cpu", weights_only=True)
    # Checkpoints saved from a wrapper often nest the weights one level down.
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    module.load_state_dict(state, strict=True)


class SmallCNNEncoder(nn.Module):
    """A four-layer CNN sized for CPU training from scratch (the default backbone).

    ``(conv 3x3 stride 2, BatchNorm, ReLU)`` blocks of 32, 64, 96 and 128 channels, each
    halving the resolution, global average pooling, then the paper's head
    ``Linear(128, D), BatchNorm1d(D), ReLU``. About 0.2 M parameters and 5 MFLOP per
    32 px image: AlexNet's 2.5 M parameters and 64 px input are sized for pretrained
    ImageNet weights, which cannot be downloaded here, and train too slowly from
    scratch on two CPU cores.

    Args:
        feature_dim: output feature size ``D``.
        width: channels of the first block; the others are 2x, 3x and 4x it.

    Example:
        >>> enc = SmallCNNEncoder(feature_dim=16).eval()
        >>> enc(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 16])
    """

    def __init__(self, feature_dim: int, width: int = 32) -> None:
        super().__init__()
        _check_positive_int("feature_dim", feature_dim)
        _check_positive_int("width", width)
        channels = [3, width, 2 * width, 3 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(channels[i], channels[i + 1], 3, stride=2, padding=1),
                nn.BatchNorm2d(channels[i + 1]),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(channels[-1], feature_dim),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True),
        )
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> features ``(B, D)``."""
        return self.head(self.features(x))


class AlexNetEncoder(nn.Module):
    """AlexNet conv features + a small regressor head, as ``Encoder_AL``/``Regressor_AL``.

    ``features`` -> adaptive avg-pool to 6x6 -> flatten (9216) -> Dropout,
    Linear(9216, 256), ReLU, Dropout, Linear(256, D), BatchNorm1d(D), ReLU.

    The adaptive pool makes any input of at least 63x63 pixels valid (64x64 images give
    a 1x1 conv map that is replicated to 6x6).

    Args:
        feature_dim: output feature size ``D``.
        pretrained_path: optional local state_dict of the whole
            ``torchvision.models.alexnet`` (its ``classifier.*`` entries are loaded but
            unused: only ``features`` is kept).
        dropout: dropout probability of the head.

    Example:
        >>> enc = AlexNetEncoder(feature_dim=16).eval()
        >>> enc(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        feature_dim: int,
        pretrained_path: str | os.PathLike | None = None,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        from torchvision.models import alexnet

        _check_positive_int("feature_dim", feature_dim)
        net = alexnet(weights=None)
        _load_local_weights(net, pretrained_path)
        self.features = net.features
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(256 * 6 * 6, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(256, feature_dim),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True),
        )
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` with ``H, W >= 63`` -> features ``(B, D)``."""
        return self.head(torch.flatten(self.avgpool(self.features(x)), 1))


class ResNet18Encoder(nn.Module):
    """Full ResNet-18 (to its 1000 logits) + a regressor head, as ``Encoder_R18``.

    resnet18 -> Dropout, Linear(1000, 512), ReLU, Dropout, Linear(512, 256), BN, ReLU,
    Dropout, Linear(256, D), BN, ReLU.

    The released code used ``F.dropout2d`` (always active, also at evaluation);
    ``nn.Dropout`` here is switched off by ``model.eval()``.

    Args:
        feature_dim: output feature size ``D``.
        pretrained_path: optional local state_dict of ``torchvision.models.resnet18``.
        dropout: dropout probability of the head.

    Example:
        >>> enc = ResNet18Encoder(feature_dim=16).eval()
        >>> enc(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        feature_dim: int,
        pretrained_path: str | os.PathLike | None = None,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        from torchvision.models import resnet18

        _check_positive_int("feature_dim", feature_dim)
        self.backbone = resnet18(weights=None)
        _load_local_weights(self.backbone, pretrained_path)
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(1000, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(256, feature_dim),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True),
        )
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> features ``(B, D)``."""
        return self.head(self.backbone(x))


class MixerEncoder(nn.Module):
    """MLP-Mixer B/16 (timm ``mixer_b16_224``), mean-pooled tokens -> Linear(768, D).

    The token-mixing MLPs depend on the number of patches, so ``image_size`` must be the
    size the model will see (a multiple of 16); 224 matches ImageNet checkpoints.

    Args:
        feature_dim: output feature size ``D``.
        image_size: input height = width, a multiple of 16.
        pretrained_path: optional local state_dict of timm's ``mixer_b16_224`` built
            with the same ``image_size`` (its classifier ``head.*`` entries are dropped).

    Example:
        >>> enc = MixerEncoder(feature_dim=16, image_size=64).eval()
        >>> enc(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        feature_dim: int,
        image_size: int = 224,
        pretrained_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        import timm

        _check_positive_int("feature_dim", feature_dim)
        _check_positive_int("image_size", image_size)
        if image_size % 16:
            raise ValueError(
                f"`image_size` must be a multiple of 16 (patch size), got {image_size}"
            )
        # num_classes=0 removes timm's classifier; its forward then returns the
        # mean-pooled 768-d tokens.
        self.backbone = timm.create_model(
            "mixer_b16_224", pretrained=False, img_size=image_size, num_classes=0
        )
        if pretrained_path is not None:
            self._load(pretrained_path)
        self.proj = nn.Linear(self.backbone.num_features, feature_dim, bias=False)
        self.feature_dim = feature_dim

    def _load(self, pretrained_path: str | os.PathLike) -> None:
        if not os.path.isfile(pretrained_path):
            raise FileNotFoundError(
                f"`pretrained_path` must be an existing state_dict file, got {str(pretrained_path)!r}"
            )
        state = torch.load(pretrained_path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        self.backbone.load_state_dict(state, strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, S, S)`` with ``S = image_size`` -> features ``(B, D)``."""
        return self.proj(self.backbone(x))


def build_encoder(
    name: EncoderName,
    feature_dim: int,
    image_size: int = 224,
    pretrained_path: str | os.PathLike | None = None,
) -> nn.Module:
    """Build the backbone ``f_phi`` by name.

    Args:
        name: ``"alexnet"``, ``"resnet18"`` or ``"mixer"``.
        feature_dim: feature size ``D`` (64 in the authors' demo, 512 in their scripts).
        image_size: input height = width; only the Mixer depends on it, AlexNet needs
            at least 63.
        pretrained_path: optional local state_dict of the underlying network.

    Returns:
        A module mapping ``(B, 3, image_size, image_size)`` images to ``(B, D)``.

    Example:
        >>> enc = build_encoder("resnet18", feature_dim=8, image_size=64).eval()
        >>> enc(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 8])
    """
    _check_positive_int("image_size", image_size)
    if name == "cnn":
        if pretrained_path is not None:
            raise ValueError("`pretrained_path` is not available for the 'cnn' backbone")
        return SmallCNNEncoder(feature_dim)
    if name == "alexnet":
        if image_size < 63:
            raise ValueError(f"`image_size` must be >= 63 for AlexNet, got {image_size}")
        return AlexNetEncoder(feature_dim, pretrained_path=pretrained_path)
    if name == "resnet18":
        return ResNet18Encoder(feature_dim, pretrained_path=pretrained_path)
    if name == "mixer":
        return MixerEncoder(feature_dim, image_size=image_size, pretrained_path=pretrained_path)
    raise ValueError(f"`name` must be one of {ENCODER_NAMES}, got {name!r}")


class Projector(nn.Module):
    """Projector ``f_theta`` (``ERM_FC``): Linear(D, 20D), BN(20D), ReLU, Linear(20D, 2).

    At ``D = 64`` it has 88,322 parameters, the "about 88K" of the appendix.

    The output is left unbounded, as the released code trained and evaluated it: labels
    lie in [-1, 1] but a tanh would saturate the gradient near the extremes, and the
    MSE/CCC losses already pull predictions into range. Clip at evaluation if needed.

    Args:
        feature_dim: input feature size ``D``.
        hidden_mult: hidden width as a multiple of ``D``.

    Example:
        >>> proj = Projector(64)
        >>> sum(p.numel() for p in proj.parameters())
        88322
        >>> proj.eval()(torch.randn(3, 64)).shape
        torch.Size([3, 2])
    """

    def __init__(self, feature_dim: int, hidden_mult: int = 20) -> None:
        super().__init__()
        _check_positive_int("feature_dim", feature_dim)
        _check_positive_int("hidden_mult", hidden_mult)
        hidden = hidden_mult * feature_dim
        self.net = nn.Sequential(
            nn.Linear(feature_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 2),
        )
        self.feature_dim = feature_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Features ``(B, D)`` -> valence/arousal ``(B, 2)``."""
        if z.dim() != 2 or z.shape[1] != self.feature_dim:
            raise ValueError(f"`z` must have shape (B, {self.feature_dim}), got {tuple(z.shape)}")
        return self.net(z)


class ELIMModel(nn.Module):
    """Encoder ``f_phi``, projector ``f_theta`` and, for ELIM-Attention, the attention
    module in one module (one DDP wrapper, one ``state_dict`` for checkpoints).

    Args:
        encoder: images ``(B, 3, S, S)`` -> features ``(B, D)``.
        projector: features ``(B, D)`` -> valence/arousal ``(B, 2)``.
        attention: an :class:`elim.attention.ELIMAttention` (``--method
            elim-attention``) or ``None``; it is used only by the ELIM step, never by
            :meth:`forward`.

    Example:
        >>> m = ELIMModel(torch.nn.Linear(3, 4), Projector(4)).eval()
        >>> z, y = m(torch.randn(5, 3))
        >>> z.shape, y.shape, m(torch.randn(5, 3), project=False)[1]
        (torch.Size([5, 4]), torch.Size([5, 2]), None)
    """

    def __init__(
        self, encoder: nn.Module, projector: nn.Module, attention: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.attention = attention

    def forward(
        self, images: torch.Tensor, project: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and, unless ``project=False``, predictions ``(B, 2)``.

        ``project=False`` serves the ELIM step, which feeds the projector matched
        features instead; skipping it keeps the projector's BatchNorm statistics from
        seeing the same batch twice.
        """
        z = self.encoder(images)
        return z, (self.projector(z) if project else None)


def build_model(cfg: TrainConfig) -> ELIMModel:
    """Encoder of ``cfg.backbone`` (``cfg.pretrained`` loaded if given) + projector, and
    ``ELIMAttention(cfg.feature_dim, cfg.attention_heads)`` for ``--method elim-attention``.

    The attention module is built *after* encoder and projector, so that with the same
    seed every method starts from the same encoder and projector weights.

    Example:
        >>> from elim.config import TrainConfig
        >>> cfg = TrainConfig(method="elim-attention", feature_dim=16)
        >>> m = build_model(cfg)
        >>> type(m.attention).__name__, build_model(TrainConfig(feature_dim=16)).attention
        ('ELIMAttention', None)
    """
    encoder = build_encoder(
        cfg.backbone, cfg.feature_dim, image_size=cfg.image_size, pretrained_path=cfg.pretrained
    )
    projector = Projector(cfg.feature_dim)
    attention = None
    if cfg.method == "elim-attention":
        attention = ELIMAttention(cfg.feature_dim, num_heads=cfg.attention_heads)
    return ELIMModel(encoder, projector, attention)


@dataclass
class Optimizers:
    """The released code's separate Adam optimisers (and MultiStepLR schedulers).

    Attributes:
        encoder: optimiser of ``f_phi`` (lr ``cfg.lr``).
        projector: optimiser of ``f_theta`` (lr ``cfg.lr * cfg.projector_lr_mult``).
        schedulers: one MultiStepLR per optimiser, stepped once per iteration.
        attention: optimiser of the ELIM-Attention module (lr ``cfg.lr *
            cfg.attention_lr_mult``), or ``None`` for the other methods.
    """

    encoder: torch.optim.Optimizer
    projector: torch.optim.Optimizer
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]
    attention: torch.optim.Optimizer | None = None

    def named(self) -> dict[str, torch.optim.Optimizer]:
        """``{"encoder": ..., "projector": ...}`` (+ ``"attention"`` when present)."""
        named = {"encoder": self.encoder, "projector": self.projector}
        if self.attention is not None:
            named["attention"] = self.attention
        return named

    def zero_grad(self) -> None:
        """Clear the gradients of every optimised parameter."""
        for opt in self.named().values():
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        """One optimiser step of every optimiser."""
        for opt in self.named().values():
            opt.step()

    def state_dict(self) -> dict:
        """Optimiser and scheduler states, for checkpoints."""
        return {
            "optimizers": {k: o.state_dict() for k, o in self.named().items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        for k, o in self.named().items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])


def build_optimizers(model: ELIMModel, cfg: TrainConfig) -> Optimizers:
    """Adam(betas) for encoder and projector; the projector's lr is ``projector_lr_mult x lr``.

    A model with an attention module (ELIM-Attention) gets a third Adam for it, lr
    ``attention_lr_mult x lr`` (default: the encoder's lr; the appendix gives none, and
    the module starts from random weights like the encoder, whereas the released
    code's reduced projector lr is meant for a head on top of pretrained features).
    """
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    enc = torch.optim.Adam(
        model.encoder.parameters(), lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay
    )
    proj = torch.optim.Adam(
        model.projector.parameters(),
        lr=cfg.lr * cfg.projector_lr_mult,
        betas=betas,
        weight_decay=cfg.weight_decay,
    )
    named = [("encoder", enc), ("projector", proj)]
    att = None
    if getattr(model, "attention", None) is not None:
        att = torch.optim.Adam(
            model.attention.parameters(),
            lr=cfg.lr * cfg.attention_lr_mult,
            betas=betas,
            weight_decay=cfg.weight_decay,
        )
        named.append(("attention", att))
    milestones = sorted(int(m) for m in cfg.milestones)
    schedulers = {
        name: torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=cfg.gamma)
        for name, opt in named
    }
    return Optimizers(enc, proj, schedulers, att)


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Keep the BatchNorm running statistics of ``module`` unchanged inside the block.

    The layers still normalise with the statistics of the current batch (train mode);
    only the running averages used at evaluation are left alone (momentum 0).

    Example:
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> with frozen_bn_stats(bn):
        ...     _ = bn(torch.randn(8, 2) + 5)
        >>> bn.running_mean.tolist()
        [0.0, 0.0]
    """
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in layers]
    if enabled:
        for m in layers:
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum
