"""The chapter's AlexNet (d2l 7.1): 5 conv + 3 FC layers, ReLU, dropout, 1 input channel, 10 classes.

At resize 224 it is exactly the book's `nn.Sequential` (46,764,746 parameters). For other resizes only
the first FC layer's input width changes: 256 * s * s, where s is the side of the last pooled map.
"""

from __future__ import annotations

import torch
from torch import nn

from alexnet import UsageError
from alexnet.config import MIN_RESIZE


def pooled_side(resize: int) -> int:
    """Side of the last feature map (256 channels) for a square input of `resize` pixels."""
    side = (resize - 11) // 4 + 1          # Conv2d(1, 96, 11, stride=4)
    side = (side - 3) // 2 + 1             # MaxPool2d(3, 2); the 5x5/pad 2 conv keeps the side
    side = (side - 3) // 2 + 1             # MaxPool2d(3, 2); the three 3x3/pad 1 convs keep it
    return (side - 3) // 2 + 1             # MaxPool2d(3, 2)


def flatten_width(resize: int) -> int:
    if resize < MIN_RESIZE:
        raise UsageError(f"model: resize = {resize} is too small for AlexNet (allowed: resize >= {MIN_RESIZE})")
    return 256 * pooled_side(resize) ** 2


def alexnet(dropout: float = 0.5, resize: int = 224) -> nn.Sequential:
    """The chapter's network, layer for layer (d2l 7.1, `net = nn.Sequential(...)`)."""
    return nn.Sequential(
        nn.Conv2d(1, 96, kernel_size=11, stride=4), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(96, 256, kernel_size=5, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Flatten(),
        nn.Linear(flatten_width(resize), 4096), nn.ReLU(),
        nn.Dropout(p=dropout),  # dropout mitigates overfitting of the two large FC layers
        nn.Linear(4096, 4096), nn.ReLU(),
        nn.Dropout(p=dropout),
        nn.Linear(4096, 10),  # 10 Fashion-MNIST classes instead of ImageNet's 1000
    )


def init_weights(model: nn.Module) -> None:
    """Xavier-uniform conv and linear weights, biases left at PyTorch's default (d2l `train_ch6`)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_shapes(resize: int = 224) -> list[tuple[str, tuple[int, ...]]]:
    """(layer class name, output shape) for one 1x1xresize x resize input, as the chapter prints them."""
    net = alexnet(resize=resize).eval()
    x = torch.zeros(1, 1, resize, resize)
    shapes = []
    with torch.no_grad():
        for layer in net:
            x = layer(x)
            shapes.append((layer.__class__.__name__, tuple(x.shape)))
    return shapes


def summary(resize: int = 224) -> str:
    """The chapter's shape table (`print(layer.__class__.__name__, 'output shape:\t', X.shape)`) and
    the parameter count."""
    lines = [f"{name} output shape:\t torch.Size({list(shape)})" for name, shape in layer_shapes(resize)]
    lines.append(f"parameters: {count_parameters(alexnet(resize=resize)):,} (resize {resize}, "
                 f"flatten width {flatten_width(resize)})")
    return "\n".join(lines)


def flops_per_image(resize: int) -> int:
    """Forward multiply-adds x 2 of the conv and linear layers for one image (used for TFLOP/s, MFU)."""
    net = alexnet(resize=resize).eval()
    x = torch.zeros(1, 1, resize, resize)
    total = 0
    with torch.no_grad():
        for layer in net:
            y = layer(x)
            if isinstance(layer, nn.Conv2d):
                kh, kw = layer.kernel_size
                total += 2 * y.numel() * layer.in_channels * kh * kw
            elif isinstance(layer, nn.Linear):
                total += 2 * layer.in_features * layer.out_features
            x = y
    return total
