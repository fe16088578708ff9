"""A small-input ResNet (He et al. 2016) for images and spectrograms."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from layerwise.models.heads import ClassifierHead
from layerwise.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; a 1x1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """stem -> stage1..stageN (each: `blocks` BasicBlocks, the first of stages 2.. halves H and W) -> head.

    stem_stride=2 adds a stride-2 conv and a max-pool for inputs larger than ~64 px.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: tuple[int, ...],
        blocks: tuple[int, ...],
        stem_stride: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        stem = [nn.Conv2d(in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=False)]
        stem += [nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        if stem_stride > 1:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        stages: OrderedDict[str, nn.Module] = OrderedDict(stem=nn.Sequential(*stem))
        in_width = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            layers = [
                BasicBlock(in_width if j == 0 else width, width, 2 if (j == 0 and i > 0) else 1) for j in range(count)
            ]
            stages[f"stage{i + 1}"] = nn.Sequential(*layers)
            in_width = width
        self.stages = nn.Sequential(stages)
        self.num_features = widths[-1]
        self.head = ClassifierHead(widths[-1], num_classes, pool="avg", dropout=dropout)

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        return list(self.stages.named_children())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)  # (B, C, H, W) -> (B, widths[-1], H', W')

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(features, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("resnet_s", modalities=("image", "audio"))
def resnet_s(in_channels: int, num_classes: int, stem_stride: int = 1, dropout: float = 0.0) -> ResNet:
    return ResNet(
        in_channels, num_classes, widths=(32, 64, 128), blocks=(1, 1, 1), stem_stride=stem_stride, dropout=dropout
    )


@register_model("resnet_m", modalities=("image", "audio"))
def resnet_m(in_channels: int, num_classes: int, stem_stride: int = 1, dropout: float = 0.0) -> ResNet:
    return ResNet(
        in_channels, num_classes, widths=(64, 128, 256), blocks=(2, 2, 2), stem_stride=stem_stride, dropout=dropout
    )


@register_model("resnet18", modalities=("image", "audio"))
def resnet18(in_channels: int, num_classes: int, stem_stride: int = 2, dropout: float = 0.0) -> ResNet:
    return ResNet(
        in_channels,
        num_classes,
        widths=(64, 128, 256, 512),
        blocks=(2, 2, 2, 2),
        stem_stride=stem_stride,
        dropout=dropout,
    )
