"""The network's sizes without torch: the feature maps' sides, the flatten width, the parameter count,
the FLOPs of one image, and the bytes a run writes. The sweep launcher says how much a trial will write before it starts, and it
never imports torch; `alexnet/training/model.py` builds the network from the same arithmetic.

Only the standard library and `alexnet/__init__.py` are imported here: a logged model that imports
`alexnet.training.model` (see there) loads where torch is all there is.
"""

from __future__ import annotations

from alexnet import UsageError

MIN_RESIZE = 67  # the third 3x3/2 max-pool needs a 3 px map: (67-11)//4+1=15 -> 7 -> 3 -> 1

CONV_PARAMETERS = (96 * 1 * 11 * 11 + 96) + (256 * 96 * 5 * 5 + 256) + (384 * 256 * 3 * 3 + 384) \
    + (384 * 384 * 3 * 3 + 384) + (256 * 384 * 3 * 3 + 256)
FC_PARAMETERS = (4096 * 4096 + 4096) + (4096 * 10 + 10)  # the second and third FC layers
HEADER_BYTES = 1 << 20  # a saved file's archive headers and pickled structure, at most


def feature_sides(resize: int) -> tuple[int, int, int, int]:
    """Sides of the feature maps for a square input of `resize` pixels: after the first conv (96 maps),
    at the 5x5 conv (256), at the three 3x3 convs (384, 384, 256), and after the last max-pool (256)."""
    conv1 = (resize - 11) // 4 + 1         # Conv2d(1, 96, 11, stride=4)
    conv2 = (conv1 - 3) // 2 + 1           # MaxPool2d(3, 2); the 5x5/pad 2 conv keeps the side
    conv3 = (conv2 - 3) // 2 + 1           # MaxPool2d(3, 2); the three 3x3/pad 1 convs keep it
    return conv1, conv2, conv3, (conv3 - 3) // 2 + 1  # MaxPool2d(3, 2)


def flatten_width(resize: int) -> int:
    if resize < MIN_RESIZE:
        raise UsageError(f"model: resize = {resize} is too small for AlexNet (allowed: resize >= {MIN_RESIZE})")
    return 256 * feature_sides(resize)[-1] ** 2


def parameter_count(resize: int) -> int:
    """Parameters of the chapter's network at `resize` (46,764,746 at 224)."""
    return CONV_PARAMETERS + flatten_width(resize) * 4096 + 4096 + FC_PARAMETERS


def flops_per_image(resize: int) -> int:
    """Forward multiply-adds x 2 of the conv and linear layers for one image (1,876,292,352 at 224), from
    the layer sides alone: a cost-aware sweep prices a trial with it where torch is not imported.
    `alexnet.training.model.flops_per_image` counts the same on the built network."""
    conv1, conv2, conv3, _ = feature_sides(resize)
    macs = conv1 ** 2 * 96 * 1 * 11 * 11 + conv2 ** 2 * 256 * 96 * 5 * 5 \
        + conv3 ** 2 * (384 * 256 + 384 * 384 + 256 * 384) * 3 * 3 \
        + flatten_width(resize) * 4096 + 4096 * 4096 + 4096 * 10
    return 2 * macs


def weights_bytes(resize: int) -> int:
    """One fp32 copy of the weights, as a checkpoint or the logged model holds it."""
    return parameter_count(resize) * 4 + HEADER_BYTES


def run_bytes(resize: int) -> dict[str, int]:
    """What a run writes at most, by file: `last.pt` (plain SGD keeps no optimizer buffers), a `best.pt`
    while the best epoch is an earlier one, and the logged model."""
    one = weights_bytes(resize)
    return {"checkpoints/last.pt": one, "checkpoints/best.pt": one, "model": one}
