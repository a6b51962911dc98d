"""The benchmark models, by name, each with the image shape it was made for.

``wrn-D-K`` is any Wide ResNet (Zagoruyko & Komodakis; the paper uses WRN-28-10 and WRN-16-4,
the tests ``wrn-10-1``). ``resnet18-cifar`` / ``resnet50-cifar`` are torchvision's ResNets with
the usual CIFAR stem (3x3 stride-1 convolution, no max-pool); ``resnet50`` is torchvision's
ImageNet ResNet-50 and ``vit-s32`` a torchvision ``VisionTransformer`` of ViT-S/32's size.
torchvision is imported only by the models that need it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ImageShape:
    """What a model takes: channels x size x size images of ``num_classes`` classes."""

    channels: int
    size: int
    num_classes: int


DIGITS = ImageShape(1, 8, 10)
CIFAR100 = ImageShape(3, 32, 100)
IMAGENET = ImageShape(3, 224, 1000)

_WRN = re.compile(r"wrn-(\d+)-(\d+)$")
MODEL_NAMES = ("digits-cnn", "wrn-28-10", "wrn-16-4", "wrn-D-K", "resnet18-cifar",
               "resnet50-cifar", "resnet50", "vit-s32")


def natural_shape(name: str) -> ImageShape:
    """The data a model was designed for (used for synthetic batches and presets)."""
    check_model_name(name)
    if name == "digits-cnn":
        return DIGITS
    if name in ("resnet50", "vit-s32"):
        return IMAGENET
    return CIFAR100


def check_model_name(name: str) -> None:
    if name in MODEL_NAMES and name != "wrn-D-K":
        return
    match = _WRN.match(name)
    if match and (int(match.group(1)) - 4) % 6 == 0 and int(match.group(1)) >= 10:
        return
    if match:
        raise ValueError(f"model {name!r}: a Wide ResNet's depth must be 6n+4 with n >= 1 "
                         "(10, 16, 22, 28, ...)")
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def build_model(name: str, shape: ImageShape) -> nn.Module:
    """A freshly initialised model for images of ``shape`` (uses the global torch RNG)."""
    check_model_name(name)
    if name == "digits-cnn":
        return digits_cnn(shape)
    match = _WRN.match(name)
    if match:
        return WideResNet(int(match.group(1)), int(match.group(2)), shape)
    if shape.channels != 3:
        raise ValueError(f"model {name!r} takes RGB images, but the data has {shape.channels} "
                         "channel(s)")
    if name in ("resnet18-cifar", "resnet50-cifar"):
        return cifar_resnet(name.split("-")[0], shape.num_classes)
    if name == "resnet50":
        return _torchvision_models().resnet50(num_classes=shape.num_classes)
    return vit_s32(shape)


def digits_cnn(shape: ImageShape = DIGITS) -> nn.Module:
    """The small CNN of the digits demo."""
    flat = 64 * (shape.size // 2) ** 2
    return nn.Sequential(
        nn.Conv2d(shape.channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, shape.num_classes))


class _WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        # The projection shortcut sees the activated input, as in the WRN reference code.
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-widen for small images: three stages of (depth-4)/6 blocks."""

    def __init__(self, depth: int, widen: int, shape: ImageShape):
        super().__init__()
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers = [nn.Conv2d(shape.channels, widths[0], 3, 1, 1, bias=False)]
        for stage in range(3):
            for i in range(blocks):
                cin = widths[stage] if i == 0 else widths[stage + 1]
                layers.append(_WideBlock(cin, widths[stage + 1], 2 if stage > 0 and i == 0 else 1))
        layers += [nn.BatchNorm2d(widths[3]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                   nn.Linear(widths[3], shape.num_classes)]
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.net(x)


def cifar_resnet(arch: str, num_classes: int) -> nn.Module:
    model = getattr(_torchvision_models(), arch)(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def vit_s32(shape: ImageShape) -> nn.Module:
    """ViT-S/32: patch 32, hidden 384, 12 layers, 6 heads, MLP 1536."""
    if shape.size % 32:
        raise ValueError(f"vit-s32 needs an image size divisible by 32, got {shape.size}")
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=shape.size, patch_size=32, num_layers=12, num_heads=6,
                             hidden_dim=384, mlp_dim=1536, num_classes=shape.num_classes)


def parameter_shapes(name: str, shape: ImageShape | None = None) -> list[torch.Size]:
    """The shapes of a model's parameters, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = build_model(name, shape or natural_shape(name))
    return [p.shape for p in model.parameters()]


def _torchvision_models():
    try:
        import torchvision.models
    except ImportError as err:
        raise RuntimeError(f"this model needs torchvision, which is not installed ({err}); "
                           "pip install torchvision") from err
    return torchvision.models
