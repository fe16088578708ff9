"""`layerwise export`: a run's network as an ONNX file that runs without layerwise.

torch.onnx's exporter (torch.export + onnxscript) writes the graph with a dynamic batch dimension (and
a dynamic sequence length for token inputs); onnxruntime then runs the file on real inputs from the
run's own data and the largest difference from PyTorch is reported. Beside the file goes the
preprocessing spec (FILE.json) a user needs to feed it: input name, shape and dtype, the front end's
settings (image side and normalisation, log-mel parameters, or the tokenizer), and the class labels.
"""

from __future__ import annotations

import math
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
class Graph:
    """One network graph to write as ONNX: a module, real example inputs, names and dynamic axes.

    Most tasks export one graph (`suffix` ""); a task with a decoding loop may export several (transcribe: the
    audio encoder, and the text decoder it runs once per token), each to FILE with its suffix before `.onnx`.
    `dynamic` holds, per input, {axis: torch.export.Dim}; inputs that share an axis share the Dim. `variants`
    are further input tuples (e.g. a shorter sequence) on which onnxruntime is also checked.
    """

    module: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic: tuple[dict, ...]
    meaning: str  # what the outputs are and how to read them, for the spec file
    suffix: str = ""
    variants: tuple[tuple[torch.Tensor, ...], ...] = ()

    def file(self, out: Path) -> Path:
        return out.with_name(f"{out.stem}.{self.suffix}{out.suffix}") if self.suffix else out


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
    """Write `out` (ONNX; more files for tasks with several graphs) and `out.json` (the preprocessing spec and
    how to read the outputs); check onnxruntime against PyTorch.

    The parity check runs on real inputs from `data` (default: the data the run was trained on).
    """
    if not hasattr(bundle.task, "export_graphs") and not hasattr(bundle.task, "example_inputs"):
        raise InputError(
            f"export: {bundle.task.name} runs cannot be exported yet; use `layerwise serve` or the Python API"
        )
    started = time.perf_counter()
    network = bundle.network.eval().cpu()
    data = data or Path(bundle.config["data"]["source"])
    if not data.exists():
        raise InputError(f"{data}: not found; the parity check needs real inputs: pass --data DIR")
    if hasattr(bundle.task, "export_graphs"):
        graphs = bundle.task.export_graphs(network, data, N_PARITY_INPUTS)
    else:
        graphs = [single_input_graph(bundle.task, network, data)]
    worst = 0.0
    for graph in graphs:
        worst = max(worst, write_graph(graph, graph.file(out)))
    spec_path = out.with_name(out.name + ".json")
    write_json(spec_path, spec(bundle, graphs, out))
    n = len(graphs[0].inputs[0])
    return ExportResult(out, spec_path, worst, f"{n} inputs from {data}", time.perf_counter() - started)


def single_input_graph(task, network: torch.nn.Module, data: Path) -> Graph:
    """Classify and generate: one tensor in (batch, and sequence for token ids, dynamic), one tensor out."""
    inputs = task.example_inputs(data, N_PARITY_INPUTS, network)
    dynamic = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    variants = ()
    if inputs.dtype == torch.int64 and inputs.ndim == 2:  # token ids (B, T): T may vary too
        dynamic[1] = torch.export.Dim("sequence", min=2, max=int(task.max_sequence_length(network)))
        variants = ((inputs[:, : max(2, inputs.shape[1] // 2)],),)
    return Graph(network, (inputs,), ("input",), ("output",), (dynamic,), task.output_meaning(), variants=variants)


def write_graph(graph: Graph, out: Path) -> float:
    """Export one graph; returns onnxruntime's largest difference from PyTorch on its inputs (whole, the first
    row, and each variant)."""
    import onnxruntime

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own progress chatter
            torch.onnx.export(
                graph.module, graph.inputs, str(out), input_names=list(graph.input_names),
                output_names=list(graph.output_names), dynamic_shapes=graph.dynamic, dynamo=True, optimize=True,
                verbose=False,
            )  # fmt: skip
    except OSError as err:
        raise InputError(f"--out {out}: cannot write there ({err.strerror})") from err
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    worst = 0.0
    first_rows = tuple(x[:1] for x in graph.inputs)
    with torch.no_grad():
        for inputs in (graph.inputs, first_rows, *graph.variants):
            expected = graph.module(*inputs)
            expected = expected if isinstance(expected, tuple) else (expected,)
            got = session.run(None, {name: x.numpy() for name, x in zip(graph.input_names, inputs, strict=True)})
            worst = max([worst, *(difference(e.numpy(), g) for e, g in zip(expected, got, strict=True))])
    return worst


def difference(expected: np.ndarray, got: np.ndarray) -> float:
    """The largest absolute difference; a NaN on one side only counts as infinite (max() would skip it)."""
    if expected.size == 0:
        return 0.0
    expected, got = expected.astype(np.float64), got.astype(np.float64)
    if (np.isnan(expected) != np.isnan(got)).any():
        return math.inf
    both = ~np.isnan(expected)
    return float(np.abs(expected[both] - got[both]).max()) if both.any() else 0.0


def spec(bundle, graphs: list[Graph], out: Path) -> dict:
    """What a user without layerwise needs to feed the ONNX file(s) and read the outputs."""
    described = [describe(graph, graph.file(out)) for graph in graphs]
    return {
        "layerwise_version": __version__,
        "task": bundle.task.name,
        "model": bundle.config["model"],
        # The (first) graph's input and output, as for every single-graph export.
        "input": described[0]["inputs"][0],
        "output": {"name": graphs[0].output_names[0], "meaning": graphs[0].meaning},
        "graphs": described,
        "preprocessing": bundle.config["preprocessing"],
        "class_labels": bundle.config.get("class_labels"),
        "calibration": bundle.config.get("calibration"),  # divide the logits by its temperature before softmax
        **({"decoding": bundle.task.export_decoding()} if hasattr(bundle.task, "export_decoding") else {}),
    }


def describe(graph: Graph, file: Path) -> dict:
    inputs = []
    for name, x, dynamic in zip(graph.input_names, graph.inputs, graph.dynamic, strict=True):
        shape = [dynamic[axis].__name__ if axis in dynamic else size for axis, size in enumerate(x.shape)]
        inputs.append({"name": name, "shape": shape, "dtype": str(x.dtype).removeprefix("torch.")})
    return {"file": file.name, "inputs": inputs, "outputs": list(graph.output_names), "meaning": graph.meaning}
