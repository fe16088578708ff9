"""`layerwise export`: a run's network as an ONNX file that runs without layerwise.

torch.onnx's exporter (torch.export + onnxscript) writes the graph with a dynamic batch dimension (and
a dynamic sequence length for token inputs); onnxruntime then runs the file on real inputs from the
run's own data and the largest difference from PyTorch is reported. Beside the file goes the
preprocessing spec (FILE.json) a user needs to feed it: input name, shape and dtype, the front end's
settings (image side and normalisation, log-mel parameters, or the tokenizer), and the class labels.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from layerwise import __version__
from layerwise.errors import InputError
from layerwise.files import write_json

PARITY_TOLERANCE = 1e-4  # max abs difference between onnxruntime and PyTorch outputs
MAX_BATCH = 4096
N_PARITY_INPUTS = 8


@dataclass(frozen=True)
class ExportResult:
    path: Path
    spec_path: Path
    max_abs_difference: float
    parity_inputs: str  # where the parity inputs came from
    seconds: float

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "spec": str(self.spec_path),
            "max_abs_difference": self.max_abs_difference,
            "parity_inputs": self.parity_inputs,
            "tolerance": PARITY_TOLERANCE,
            "seconds": round(self.seconds, 2),
        }


def export_onnx(bundle, out: Path, data: Path | None = None) -> ExportResult:
    """Write `out` (ONNX) and `out.json` (preprocessing spec); check onnxruntime against PyTorch.

    The parity check runs on real inputs from `data` (default: the data the run was trained on).
    """

    if not hasattr(bundle.task, "example_inputs"):
        raise InputError(
            f"export: {bundle.task.name} runs cannot be exported yet (classify and generate runs can); "
            "use `layerwise serve` or the Python API"
        )
    started = time.perf_counter()
    network = bundle.network.eval().cpu()
    data = data or Path(bundle.config["data"]["source"])
    if not data.exists():
        raise InputError(f"{data}: not found; the parity check needs real inputs: pass --data DIR")
    inputs = bundle.task.example_inputs(data, N_PARITY_INPUTS, network)
    origin = f"{len(inputs)} inputs from {data}"
    tokens = inputs.dtype == torch.int64 and inputs.ndim == 2  # token ids (B, T): T may vary too
    max_sequence = int(bundle.task.max_sequence_length(network)) if tokens else 0
    worst = write_onnx(network, inputs, out, ["output"], max_sequence)
    spec_path = out.with_name(out.name + ".json")
    write_json(spec_path, spec(bundle, inputs, tokens))
    return ExportResult(out, spec_path, worst, origin, time.perf_counter() - started)


def write_onnx(
    module: torch.nn.Module, inputs: torch.Tensor, out: Path, output_names: list[str], max_sequence: int = 0
) -> float:
    """Export `module` (one input, the given outputs) with a dynamic batch, and a dynamic sequence length up to
    `max_sequence` when it is positive; returns onnxruntime's largest difference from PyTorch on `inputs`
    (whole, one row, and half the sequence)."""
    import onnxruntime

    dynamic = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    if max_sequence:
        dynamic[1] = torch.export.Dim("sequence", min=2, max=max_sequence)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own progress chatter
            torch.onnx.export(
                module, (inputs,), str(out), input_names=["input"], output_names=output_names,
                dynamic_shapes=(dynamic,), dynamo=True, optimize=True, verbose=False,
            )  # fmt: skip
    except OSError as err:
        raise InputError(f"--out {out}: cannot write there ({err.strerror})") from err
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for batch in (inputs, inputs[:1]) + ((inputs[:, : max(2, inputs.shape[1] // 2)],) if max_sequence else ()):
            expected = module(batch)
            expected = expected if isinstance(expected, tuple) else (expected,)
            got = session.run(None, {"input": batch.numpy()})
            worst = max([worst] + [float(np.abs(e.numpy() - g).max()) for e, g in zip(expected, got, strict=True)])
    return worst


def spec(bundle, inputs: torch.Tensor, tokens: bool) -> dict:
    """What a user without layerwise needs to feed the ONNX file and read its output."""
    shape = ["batch", "sequence" if tokens else inputs.shape[1], *list(inputs.shape[2:])]
    return {
        "layerwise_version": __version__,
        "task": bundle.task.name,
        "model": bundle.config["model"],
        "input": {"name": "input", "shape": shape, "dtype": str(inputs.dtype).removeprefix("torch.")},
        "output": {"name": "output", "meaning": bundle.task.output_meaning()},
        "preprocessing": bundle.config["preprocessing"],
        "class_labels": bundle.config.get("class_labels"),
        "calibration": bundle.config.get("calibration"),  # divide the logits by its temperature before softmax
    }
