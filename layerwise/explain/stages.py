"""Looking inside any registered model through `named_stages()`: stage outputs, pooled vectors, receptive fields.

Nothing here knows a model by name. A stage output is either a feature map (B, C, H, W) or a
token sequence (B, T, D); both are viewed as (B, units, positions) so the same code finds what
excites a unit in a convnet and in a transformer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from layerwise.data.text import TokenRoles

RF_PROBES = 4  # random inputs whose gradients are pooled to measure a receptive field
RF_CANVAS = 2  # probe on inputs this much larger: a field is never shown wider than the input either side


def stages_of(network: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's named stages, shallow to deep."""
    stages = list(network.named_stages())
    if not stages:
        raise ValueError(f"{type(network).__name__}.named_stages() is empty")
    return stages


@contextmanager
def recorded(stages: list[tuple[str, nn.Module]]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward pass stores each stage's output under its name (overwritten per pass)."""
    outputs: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            outputs[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in stages]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def token_mask(x: torch.Tensor, roles: TokenRoles | None) -> torch.Tensor | None:
    """For token-id input (B, T): True at words (not [PAD], [CLS] or [SEP], by the front end's `roles`); None
    for other inputs."""
    if x.dtype in (torch.int64, torch.int32) and x.ndim == 2:
        if roles is None:
            raise ValueError("token ids need the front end's token roles (frontend.token_roles)")
        return roles.words(x)
    return None


def as_units(output: torch.Tensor) -> torch.Tensor:
    """A stage output as (B, units, positions): (B, C, H, W) -> (B, C, H*W); (B, T, D) -> (B, D, T)."""
    if output.ndim == 4:
        return output.flatten(2)
    if output.ndim == 3:
        return output.transpose(1, 2)
    if output.ndim == 2:
        return output[:, :, None]
    raise ValueError(f"cannot read a stage output of shape {tuple(output.shape)}")


def position_mask(output: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """(B, positions) bool: where a unit's activation counts (all positions, or real tokens of a sequence)."""
    b, positions = output.shape[0], as_units(output).shape[2]
    if output.ndim == 3 and tokens is not None and tokens.shape[1] == positions:
        # a text with no real token (only [CLS]) keeps its [CLS] position so it still has one
        return tokens | ~tokens.any(1, keepdim=True) & (torch.arange(positions, device=tokens.device) == 0)
    return torch.ones(b, positions, dtype=torch.bool, device=output.device)


def pooled(output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One vector per example for a linear probe: mean and max of every unit over its positions, (B, 2*units).

    For a sequence the first position ([CLS], what the classifier reads) is appended: (B, 3*units).
    """
    units = as_units(output).float()  # (B, U, P)
    m = mask[:, None, :]
    mean = (units * m).sum(2) / m.sum(2).clamp_min(1)
    peak = units.masked_fill(~m, float("-inf")).amax(2)
    parts = [mean, peak]
    if output.ndim == 3:
        parts.append(units[:, :, 0])
    return torch.cat(parts, 1)


@dataclass(frozen=True)
class ReceptiveField:
    """Where a stage position looks in the input, relative to the position's centre, in input pixels.

    On a stage grid (H', W') over an input (H, W), position (i, j) is centred at
    cy = (i + 0.5) * H / H' - 0.5 (likewise cx) and sees rows cy + top .. cy + bottom.
    """

    top: int
    bottom: int
    left: int
    right: int

    @property
    def size(self) -> tuple[int, int]:
        return self.bottom - self.top + 1, self.right - self.left + 1

    def box(self, position: int, grid: tuple[int, int], input_hw: tuple[int, int]) -> tuple[int, int, int, int]:
        """Flat position on the grid -> input box (y0, y1, x0, x1), end-exclusive, clipped to the input."""
        i, j = divmod(position, grid[1])
        cy, cx = (i + 0.5) * input_hw[0] / grid[0] - 0.5, (j + 0.5) * input_hw[1] / grid[1] - 0.5
        y0, y1 = max(0, round(cy + self.top)), min(input_hw[0], round(cy + self.bottom) + 1)
        x0, x1 = max(0, round(cx + self.left)), min(input_hw[1], round(cx + self.right) + 1)
        return y0, y1, x0, x1


def receptive_fields(network: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, ReceptiveField]:
    """Measure each feature-map stage's receptive field for input (C, H, W), by gradients.

    The gradient of one central output position (summed over channels) w.r.t. a batch of random
    inputs is non-zero exactly where that position looks; the box around the non-zero region,
    relative to the position's centre, holds for every position (edges are clipped later). The
    probe runs on a larger canvas when the model accepts one, so a field wider than the input
    is measured whole.
    """
    c, h, w = input_shape
    try:
        return _measure_fields(network, (c, RF_CANVAS * h, RF_CANVAS * w))
    except RuntimeError:  # a model that only takes its own input size
        return _measure_fields(network, input_shape)


def _measure_fields(network: nn.Module, probe_shape: tuple[int, int, int]) -> dict[str, ReceptiveField]:
    stages = stages_of(network)
    device = next(network.parameters()).device
    x = torch.randn(RF_PROBES, *probe_shape, device=device, requires_grad=True)
    fields: dict[str, ReceptiveField] = {}
    with recorded(stages) as outputs:
        network(x)
        for name, _ in stages:
            out = outputs[name]
            if out.ndim != 4:
                continue
            gh, gw = out.shape[2:]
            ci, cj = gh // 2, gw // 2
            (grad,) = torch.autograd.grad(out[:, :, ci, cj].sum(), x, retain_graph=True)
            hit = grad.abs().sum((0, 1)) > 0  # (H, W) of the probe
            stride = (probe_shape[1] / gh, probe_shape[2] / gw)
            cy, cx = (ci + 0.5) * stride[0] - 0.5, (cj + 0.5) * stride[1] - 0.5
            rows, cols = hit.any(1).nonzero().flatten(), hit.any(0).nonzero().flatten()
            if len(rows) == 0:  # a dead stage: say it sees its own cell only
                rows, cols = torch.tensor([round(cy)]), torch.tensor([round(cx)])
            fields[name] = ReceptiveField(
                top=int(rows.min()) - round(cy),
                bottom=int(rows.max()) - round(cy),
                left=int(cols.min()) - round(cx),
                right=int(cols.max()) - round(cx),
            )
    return fields


def first_layer_weights(network: nn.Module) -> tuple[str, torch.Tensor] | None:
    """The first convolution's filters (out, in, kh, kw), or the first embedding table (vocab, dim)."""
    for name, module in network.named_modules():
        if isinstance(module, nn.Conv2d | nn.Conv1d):
            return name, module.weight.detach().float().cpu()
        if isinstance(module, nn.Embedding):
            return name, module.weight.detach().float().cpu()
    return None


def first_embedding(network: nn.Module) -> nn.Embedding | None:
    """The first token embedding in module order: where text attributions are taken."""
    return next((m for m in network.modules() if isinstance(m, nn.Embedding)), None)
