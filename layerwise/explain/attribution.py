"""Why one prediction: Integrated Gradients and Grad-CAM (with Captum) for any registered model.

Scores are returned at the resolution a person looks at:
  image / audio  IG (C, H, W) over the model input; Grad-CAM (H, W), upsampled from the last stage
  text           one score per token position (T,): IG on the first token embedding (summed over
                 its dimension), Grad-CAM on the last stage's token outputs
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, LayerIntegratedGradients
from torch import nn

from layerwise.data.text import TokenRoles
from layerwise.explain.stages import first_embedding, recorded, stages_of

METHODS = ("ig", "gradcam")
METHOD_NAMES = {"ig": "Integrated Gradients", "gradcam": "Grad-CAM"}
IG_STEPS = 32  # Riemann steps of the path integral; the convergence delta says whether that sufficed
IG_BATCH = 64  # interpolated inputs per forward pass


@dataclass(frozen=True)
class Attribution:
    method: str  # "ig" or "gradcam"
    target: int  # class index explained
    scores: torch.Tensor  # (C, H, W) / (H, W) / (T,): see the module docstring
    delta: float | None = None  # IG completeness gap: sum(scores) - (f(x) - f(baseline)), in logits


def baseline_for(x: torch.Tensor, roles: TokenRoles | None = None) -> torch.Tensor:
    """The 'absence of signal' IG starts from, per example.

    Token ids (`roles`: the front end's special ids): every word replaced by [MASK] ([CLS], [SEP] and [PAD]
    kept, so the attention pattern is the same). Images and spectrograms: each input's own minimum everywhere
    (black, or silence).
    """
    if not x.is_floating_point():
        if roles is None:
            raise ValueError("token ids need the front end's token roles (frontend.token_roles) for a baseline")
        return torch.where(roles.words(x), torch.full_like(x, roles.mask), x)
    return x.amin(dim=tuple(range(1, x.ndim)), keepdim=True).expand_as(x).contiguous()


def integrated_gradients(
    network: nn.Module, x: torch.Tensor, targets: torch.Tensor, roles: TokenRoles | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """IG (Sundararajan et al. 2017) of each target logit; returns (scores, convergence delta (B,))."""
    baseline = baseline_for(x, roles)
    if x.is_floating_point():
        ig = IntegratedGradients(network)
        scores, delta = ig.attribute(
            x, baseline, target=targets, n_steps=IG_STEPS, internal_batch_size=IG_BATCH, return_convergence_delta=True
        )
        return scores.detach(), delta.detach()
    embedding = first_embedding(network)
    if embedding is None:
        raise ValueError(f"{type(network).__name__} takes token ids but has no nn.Embedding to attribute to")
    ig = LayerIntegratedGradients(network, embedding)
    scores, delta = ig.attribute(
        x, baseline, target=targets, n_steps=IG_STEPS, internal_batch_size=IG_BATCH, return_convergence_delta=True
    )
    return scores.detach().sum(-1), delta.detach()  # (B, T, D) -> (B, T)


def grad_cam(network: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) on the last stage: (B, H, W) at input size, or (B, T) for sequences."""
    name, last = stages_of(network)[-1]
    grid = network.token_grid(tuple(x.shape[2:])) if x.ndim == 4 and hasattr(network, "token_grid") else None
    tokens = token_grad_cam(network, name, last, x, targets) if grid is not None else None
    if tokens is not None and tokens.ndim == 2 and tokens.shape[1] == grid[0] + grid[1] * grid[2]:
        # a vision transformer: token scores laid back on its patch grid
        cam = tokens[:, grid[0] :].reshape(-1, 1, grid[1], grid[2])
        return LayerAttribution.interpolate(cam, tuple(x.shape[2:]), "bilinear")[:, 0]
    if x.ndim == 4:
        cam = LayerGradCam(network, last).attribute(x, target=targets, relu_attributions=True)  # (B, 1, H', W')
        return LayerAttribution.interpolate(cam, tuple(x.shape[2:]), "bilinear")[:, 0].detach()
    return token_grad_cam(network, name, last, x, targets)


def token_grad_cam(network: nn.Module, name: str, last: nn.Module, x: torch.Tensor, targets: torch.Tensor):
    """Grad-CAM of a stage whose outputs are tokens (B, T, D): (B, T)."""
    # Token outputs (B, T, D): channels are last, which captum's LayerGradCam does not read; the same
    # formula with D as channels: weights = gradient averaged over positions, CAM = ReLU(acts . weights).
    with recorded([(name, last)]) as outputs:
        logits = network(x)
        acts = outputs[name]
        (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), acts)
    weights = grads.mean(1, keepdim=True)  # (B, 1, D)
    return torch.relu((acts * weights).sum(-1)).detach()  # (B, T)


def attribute(
    network: nn.Module, x: torch.Tensor, targets: torch.Tensor, method: str, roles: TokenRoles | None = None
) -> list[Attribution]:
    """Attributions of `method` for a batch of model inputs `x` and class indices `targets` (B,); `roles`: the
    text front end's special ids, for token-id inputs."""
    network.eval()
    targets = targets.to(x.device)
    if method == "ig":
        scores, delta = integrated_gradients(network, x, targets, roles)
        return [Attribution("ig", int(t), s.cpu(), float(d)) for t, s, d in zip(targets, scores, delta, strict=True)]
    if method == "gradcam":
        return [
            Attribution("gradcam", int(t), s.cpu()) for t, s in zip(targets, grad_cam(network, x, targets), strict=True)
        ]
    raise ValueError(f"unknown attribution method {method!r} (known: {', '.join(METHODS)})")
