"""`Model`: a trained network with its front end and class labels; saved as a run directory.

Loading reads only JSON and safetensors: no pickle, no code from the run directory is executed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from layerwise import __version__
from layerwise.data.frontend import FrontEnd, frontend_from_json
from layerwise.data.sources import Example, Problem, Source, discover, discover_files
from layerwise.errors import InputError
from layerwise.models.registry import create_model
from layerwise.tasks.classify import Prediction, classification_metrics, decode
from layerwise.train.batches import TensorBatches
from layerwise.train.loop import predict_logits, resolve_device

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
FORMAT_VERSION = 1  # bump when config.json changes incompatibly
PREDICT_BATCH = 256


def write_json(path: Path, document: dict) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)


class Model:
    """What `layerwise.fit` returns and `layerwise.load` reads back."""

    def __init__(self, network: nn.Module, frontend: FrontEnd, class_names: list[str], config: dict) -> None:
        self.network = network.eval()
        self.frontend = frontend
        self.class_names = class_names
        self.config = config
        self.summary: dict = {}  # metrics.json content, set by fit()

    @property
    def modality(self) -> str:
        return self.frontend.modality

    def save(self, run_dir: Path) -> None:
        """Write config.json and model.safetensors into `run_dir`."""
        run_dir.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        tmp = run_dir / f".{WEIGHTS_FILE}.tmp"
        save_file(weights, str(tmp), metadata={"layerwise_version": __version__})
        os.replace(tmp, run_dir / WEIGHTS_FILE)
        write_json(run_dir / CONFIG_FILE, self.config)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Cached front-end tensors (N, ...) -> logits (N, classes)."""
        batches = TensorBatches(
            inputs, torch.zeros(len(inputs), dtype=torch.int64), PREDICT_BATCH, self.frontend.model_input
        )
        return predict_logits(self.network, batches)[0]

    def predict(self, inputs: list[str | Path], k: int = 3) -> tuple[list[Prediction], list[Problem]]:
        """Predict files (paths, or folders searched recursively) or, for text models, raw strings.

        Returns the predictions and the inputs that could not be decoded.
        """
        examples, problems = self.find_inputs(inputs)
        tensors, kept, decode_problems = self.frontend.decode_all(examples)
        problems += decode_problems
        origins = [examples[i].origin for i in kept]
        return decode(self.logits(tensors), self.class_names, origins, k), problems

    def find_inputs(self, inputs: list[str | Path]) -> tuple[list[Example], list[Problem]]:
        """Files and folders (searched recursively); for a text model, a str that is not a path is the text."""
        examples: list[Example] = []
        paths: list[Path] = []
        for item in inputs:
            if isinstance(item, str) and self.modality == "text" and not Path(item).exists():
                examples.append(Example(origin=item[:60], label=None, text=item))
            else:
                paths.append(Path(item))
        problems: list[Problem] = []
        if paths:
            found = discover_files(paths, self.modality)
            examples += found.examples
            problems += found.problems
        return examples, problems

    def labelled_examples(self, source: Source) -> tuple[list[Example], list[int], list[Problem]]:
        """The examples whose label is one of this model's classes, their class indices, and the rest as problems."""
        index = {name: i for i, name in enumerate(self.class_names)}
        examples, problems = [], list(source.problems)
        for example in source.examples:
            if example.label in index:
                examples.append(example)
            else:
                problems.append(Problem(example.origin, f"label {example.label!r} is not one of the model's classes"))
        return examples, [index[ex.label] for ex in examples], problems

    def evaluate(self, data: str | Path | Source) -> tuple[dict, list[Problem]]:
        """Metrics on labelled data (a class-folder tree or CSV manifest) and the skipped inputs."""
        source = data if isinstance(data, Source) else discover(data, self.modality)
        examples, label_ids, problems = self.labelled_examples(source)
        tensors, kept, decode_problems = self.frontend.decode_all(examples)
        problems += decode_problems
        if not kept:
            raise InputError(f"{source.root}: no usable labelled examples to evaluate")
        labels = torch.tensor([label_ids[i] for i in kept])
        return classification_metrics(self.logits(tensors), labels, len(self.class_names)), problems


def load(run_dir: str | Path) -> Model:
    """Read a run directory. Raises InputError naming the file or tensor that is wrong."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(f"{config_path}: not found; is {run_dir} a layerwise run directory?")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{config_path}: not valid JSON ({err})") from err
    if config.get("format") != FORMAT_VERSION:
        raise InputError(
            f"{config_path}: written by layerwise {config.get('layerwise_version', 'unknown')} in format "
            f"{config.get('format')}, this is layerwise {__version__} reading format {FORMAT_VERSION}"
        )
    try:
        frontend = frontend_from_json(config["preprocessing"])
        network = create_model(config["model"]["name"], **config["model"]["config"])
        class_names = list(config["class_labels"])
    except (KeyError, TypeError) as err:
        raise InputError(f"{config_path}: missing or malformed field {err}") from err
    load_weights(network, run_dir / WEIGHTS_FILE)
    network.to(resolve_device("auto"))
    return Model(network, frontend, class_names, config)


def load_weights(network: nn.Module, path: Path) -> None:
    """Load safetensors weights, checking every tensor's presence, shape and dtype first."""
    if not path.is_file():
        raise InputError(f"{path}: not found")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path}: not a readable safetensors file ({err})") from err
    expected = network.state_dict()
    for name, tensor in expected.items():
        if name not in weights:
            raise InputError(f"{path}: tensor {name!r} is missing")
        got = weights[name]
        if got.shape != tensor.shape:
            raise InputError(f"{path}: tensor {name!r} has shape {tuple(got.shape)}, expected {tuple(tensor.shape)}")
        if got.dtype != tensor.dtype:
            raise InputError(f"{path}: tensor {name!r} has dtype {got.dtype}, expected {tensor.dtype}")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise InputError(f"{path}: unexpected tensor {unexpected[0]!r} (and {len(unexpected) - 1} more)")
    network.load_state_dict(weights)
