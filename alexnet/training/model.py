"""The chapter's AlexNet (d2l 7.1): 5 conv + 3 FC layers, ReLU, dropout, 1 input channel, 10 classes.

At resize 224 it is exactly the book's `nn.Sequential` (46,764,746 parameters). For other resizes only
the first FC layer's input width changes: 256 * s * s, where s is the side of the last pooled map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alexnet.training.sizes import flatten_width


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


class RawImages(nn.Module):
    """The logged model: the network behind the run's own input pipeline, so it takes what a user has.
    In: a batch of 28x28 Fashion-MNIST images, uint8 0-255 or float in [0, 1] (a float above 1 is
    refused), B x 28 x 28 or B x 1 x 28 x 28. Out: class scores, B x 10. Inside: `ToTensor`'s scaling,
    the channel dimension, and the run's resize, bilinear with half-pixel centres as in
    `alexnet.training.data.resize_batch` (within 1/255 of the chapter's PIL `Resize`). Torch only: it loads where
    `alexnet` is not installed."""

    def __init__(self, net: nn.Module, resize: int):
        super().__init__()
        self.net, self.resize = net, resize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 and images.numel() and float(images.max()) > 1:
            # 0-255 floats read as [0, 1] would give confident, wrong classes: refuse them.
            raise ValueError(f"RawImages: float images must be in [0, 1] (ToTensor's scale), got values up to "
                             f"{float(images.max()):g}: divide by 255, or pass the uint8 images as they are")
        x = images.float().div(255) if images.dtype == torch.uint8 else images.float()
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.shape[-1] != self.resize or x.shape[-2] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False, antialias=False)
        return self.net(x)


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
