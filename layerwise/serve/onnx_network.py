"""A classifier's forward pass on ONNX Runtime, for `serve`: the same answers at ~2.5x PyTorch's CPU throughput.

The network is exported once (as `layerwise export` does) with two outputs, the pooled embedding and the
logits, and `OnnxClassifier` offers the three methods inference calls (`forward_features`, `forward_head`,
`forward`), so calibration, top-k and the out-of-distribution score run unchanged on top of it. The export
is used only when onnxruntime matches PyTorch within export's tolerance on the run's own inputs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from layerwise.serve.export import PARITY_TOLERANCE, single_input_graph, write_graph

OUTPUTS = ["embedding", "logits"]


class EmbeddingAndLogits(nn.Module):
    """What is exported: one pass giving the pooled embedding (the OOD score's input) and the logits."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.network.forward_features(x)
        return self.network.forward_head(features, pre_logits=True), self.network.forward_head(features)


class OnnxClassifier(nn.Module):
    """An exported EmbeddingAndLogits behind the classifier methods; its "features" are (embedding, logits)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime

        super().__init__()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        # No weights of its own; a parameter tells inference code which device to put inputs on.
        self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding, logits = self.session.run(None, {"input": np.ascontiguousarray(x.cpu().numpy())})
        return torch.from_numpy(embedding), torch.from_numpy(logits)

    def forward_head(self, features: tuple[torch.Tensor, torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        return features[0] if pre_logits else features[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def export_for_serving(bundle, out: Path) -> str | None:
    """Export the run's classifier to `out` for OnnxClassifier; None when it was exported and matches PyTorch,
    else the reason the server should run PyTorch instead."""
    # Tasks whose predictions come from one tensor in, logits out (classification) offer example_inputs and
    # predict; the others (boxes, structures, text generation) keep their own decoding on PyTorch.
    if "predict" not in bundle.task.commands or not hasattr(bundle.task, "example_inputs"):
        return f"{bundle.task.name} runs are served with PyTorch"
    data = Path(bundle.config["data"]["source"])
    if not data.exists():
        return f"the run's data ({data}) is not here for the parity check"
    network = bundle.network.eval().cpu()
    try:
        graph = single_input_graph(bundle.task, network, data)
        worst = write_graph(replace(graph, module=EmbeddingAndLogits(network), output_names=tuple(OUTPUTS)), out)
    except Exception as err:  # noqa: BLE001 - any exporter failure just means serving with PyTorch
        return f"the ONNX export failed ({type(err).__name__}: {str(err)[:200]})"
    if worst > PARITY_TOLERANCE:
        return f"onnxruntime differs from PyTorch by {worst:.1e} (> {PARITY_TOLERANCE:g})"
    return None
