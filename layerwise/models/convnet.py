"""A plain VGG-style CNN: fast on CPUs for small images (28-48 px) and spectrograms."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from layerwise.models.heads import ClassifierHead
from layerwise.models.registry import register_model


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ConvNet(nn.Module):
    """stem (1 conv) -> pool -> stage1 (2 convs) -> pool -> stage2 (2 convs) -> head."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, int, int], dropout: float) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stages = nn.Sequential(
            OrderedDict(
                stem=conv_bn_relu(in_channels, w1),
                stage1=nn.Sequential(nn.MaxPool2d(2), conv_bn_relu(w1, w2), conv_bn_relu(w2, w2)),
                stage2=nn.Sequential(nn.MaxPool2d(2), conv_bn_relu(w2, w3), conv_bn_relu(w3, w3)),
            )
        )
        self.num_features = w3
        self.head = ClassifierHead(w3, num_classes, pool="avg", dropout=dropout)

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        return list(self.stages.named_children())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)  # (B, C, H, W) -> (B, w3, H/4, W/4)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(features, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("convnet_s", modalities=("image", "audio"))
def convnet_s(in_channels: int, num_classes: int, dropout: float = 0.1) -> ConvNet:
    return ConvNet(in_channels, num_classes, widths=(32, 64, 128), dropout=dropout)


@register_model("convnet_m", modalities=("image", "audio"))
def convnet_m(in_channels: int, num_classes: int, dropout: float = 0.1) -> ConvNet:
    return ConvNet(in_channels, num_classes, widths=(48, 96, 192), dropout=dropout)
