"""The network is the chapter's, layer for layer."""

import pytest
import torch

from alexnet import UsageError
from alexnet.training.model import alexnet, count_parameters, flatten_width, flops_per_image, layer_shapes
from conftest import run_cli

# Printed in the chapter (d2l 7.1, "每层输出的形状") for X = torch.randn(1, 1, 224, 224).
CHAPTER_TABLE = """\
Conv2d output shape:         torch.Size([1, 96, 54, 54])
ReLU output shape:           torch.Size([1, 96, 54, 54])
MaxPool2d output shape:      torch.Size([1, 96, 26, 26])
Conv2d output shape:         torch.Size([1, 256, 26, 26])
ReLU output shape:           torch.Size([1, 256, 26, 26])
MaxPool2d output shape:      torch.Size([1, 256, 12, 12])
Conv2d output shape:         torch.Size([1, 384, 12, 12])
ReLU output shape:           torch.Size([1, 384, 12, 12])
Conv2d output shape:         torch.Size([1, 384, 12, 12])
ReLU output shape:           torch.Size([1, 384, 12, 12])
Conv2d output shape:         torch.Size([1, 256, 12, 12])
ReLU output shape:           torch.Size([1, 256, 12, 12])
MaxPool2d output shape:      torch.Size([1, 256, 5, 5])
Flatten output shape:        torch.Size([1, 6400])
Linear output shape:         torch.Size([1, 4096])
ReLU output shape:           torch.Size([1, 4096])
Dropout output shape:        torch.Size([1, 4096])
Linear output shape:         torch.Size([1, 4096])
ReLU output shape:           torch.Size([1, 4096])
Dropout output shape:        torch.Size([1, 4096])
Linear output shape:         torch.Size([1, 10])
"""


def normalise(line):
    return " ".join(line.replace("\t", " ").split())


def test_summary_prints_the_chapters_table_line_by_line():
    result = run_cli("summary", "--resize", "224")
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    expected = CHAPTER_TABLE.splitlines()
    assert [normalise(l) for l in printed[:len(expected)]] == [normalise(l) for l in expected]
    assert "46,764,746" in printed[len(expected)]


def test_layer_shapes_match_the_chapter():
    names_shapes = [(name, shape) for name, shape in layer_shapes(224)]
    assert len(names_shapes) == 21
    assert names_shapes[0] == ("Conv2d", (1, 96, 54, 54))
    assert names_shapes[12] == ("MaxPool2d", (1, 256, 5, 5))
    assert names_shapes[-1] == ("Linear", (1, 10))


def test_parameter_count_at_224_is_the_chapters():
    assert count_parameters(alexnet(resize=224)) == 46_764_746


@pytest.mark.parametrize("resize, side", [(67, 1), (96, 1), (128, 2), (160, 3), (192, 4), (224, 5)])
def test_flatten_width_is_derived_from_the_resize(resize, side):
    assert flatten_width(resize) == 256 * side * side
    assert layer_shapes(resize)[13] == ("Flatten", (1, 256 * side * side))


def test_dropout_is_a_parameter():
    net = alexnet(dropout=0.3, resize=96)
    assert [m.p for m in net if m.__class__.__name__ == "Dropout"] == [0.3, 0.3]


def test_a_resize_below_the_minimum_is_refused():
    with pytest.raises(UsageError, match="resize >= 67"):
        alexnet(resize=66)
    result = run_cli("summary", "--resize", "50")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "resize" in result.stderr


@pytest.mark.parametrize("resize", [67, 128, 224])
def test_flop_count_agrees_with_torchs_own_counter(resize):
    """`flops_per_image` (our per-layer arithmetic, behind every TFLOP/s and MFU figure) against PyTorch's
    FlopCounterMode, which counts the convolutions and matmuls the forward pass actually dispatches."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net = alexnet(resize=resize).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(4, 1, resize, resize))
    assert flops_per_image(resize) == counter.get_total_flops() // 4


@pytest.mark.parametrize("resize", [67, 75, 96, 131, 224, 227])
def test_the_torch_free_flop_count_agrees_with_the_networks(resize):
    """`alexnet.training.sizes.flops_per_image` (what a cost-aware sweep's launcher and workers price trials with)
    against the count on the built network."""
    from alexnet.training import sizes

    assert sizes.flops_per_image(resize) == flops_per_image(resize)


def test_the_forward_pass_at_224_is_1_876_gflop():
    assert flops_per_image(224) == 1_876_292_352  # d2l 7.1's network, one 1x224x224 image


def test_the_raw_image_model_takes_uint8_or_unit_floats_and_refuses_0_255_floats():
    from alexnet.training.model import RawImages, alexnet

    model = RawImages(alexnet(resize=67).eval(), 67).eval()
    images = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        scores = model(images)
        assert scores.shape == (2, 10)
        assert torch.allclose(model(images.float() / 255), scores, atol=1e-6)
        assert torch.allclose(model((images.float() / 255).unsqueeze(1)), scores, atol=1e-6)
        with pytest.raises(ValueError, match=r"float images must be in \[0, 1\] \(ToTensor's scale\), got values up to 2[0-9][0-9]"):
            model(images.float())
