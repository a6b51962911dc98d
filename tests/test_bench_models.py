"""The benchmark models: published sizes, and a forward pass on the shapes they are made for."""

import pytest
import torch

from bench.models import ImageShape, build_model, check_model_name, natural_shape, parameter_shapes


@pytest.mark.parametrize("name, millions", [("wrn-28-10", 36.5), ("wrn-16-4", 2.75), ("resnet50", 25.6),
                                            ("resnet18-cifar", 11.2), ("vit-s32", 22.9)])
def test_parameter_counts_match_the_published_sizes(name, millions):
    if not name.startswith("wrn"):
        pytest.importorskip("torchvision")
    total = sum(s.numel() for s in parameter_shapes(name))
    assert total / 1e6 == pytest.approx(millions, rel=0.01)


@pytest.mark.parametrize("name, shape", [
    ("wrn-10-1", ImageShape(3, 32, 100)),
    ("resnet18-cifar", ImageShape(3, 32, 10)),
    ("vit-s32", ImageShape(3, 64, 7)),
    ("digits-cnn", ImageShape(1, 8, 10)),
])
def test_forward_gives_one_logit_per_class(name, shape):
    if name in ("resnet18-cifar", "vit-s32"):
        pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = build_model(name, shape)
    out = model(torch.randn(2, shape.channels, shape.size, shape.size))
    assert out.shape == (2, shape.num_classes)


def test_natural_shapes_and_name_checks():
    assert natural_shape("wrn-28-10") == ImageShape(3, 32, 100)
    assert natural_shape("vit-s32") == ImageShape(3, 224, 1000)
    check_model_name("wrn-40-2")
    with pytest.raises(ValueError, match="6n\\+4"):
        check_model_name("wrn-8-2")
    with pytest.raises(ValueError, match="divisible by 32"):
        build_model("vit-s32", ImageShape(3, 48, 10))
    with pytest.raises(ValueError, match="RGB"):
        build_model("resnet50", ImageShape(1, 32, 10))
