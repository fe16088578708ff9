"""`Model`: a trained network with its fitted task (preprocessing, labels, decoder); saved as a run directory.

Loading reads only JSON and safetensors: no pickle, no code from the run directory is executed.
Nothing here imports the training loop, progress bars, signal handling or checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from layerwise import __version__
from layerwise.errors import InputError
from layerwise.files import write_atomic, write_json, write_safetensors
from layerwise.models.registry import create_model
from layerwise.runtime import resolve_device

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
FORMAT_VERSION = 1  # bump when config.json changes incompatibly


class Model:
    """What `layerwise.fit` returns and `layerwise.load` reads back: a network and its fitted task."""

    def __init__(self, network: nn.Module, task, config: dict) -> None:
        self.network = network.eval()
        self.task = task
        self.config = config
        self.summary: dict = {}  # metrics.json content, set by fit()

    @property
    def task_name(self) -> str:
        return self.task.name

    def require(self, command: str) -> None:
        """Refuse, with one clear line, a command this run's task does not answer."""
        if command not in self.task.commands:
            if not self.task.commands:  # a run that is only a starting point (a pretrain run)
                raise InputError(
                    f"`layerwise {command}` does not apply to a {self.task.name} run; start a run from it: "
                    "layerwise train DATA --out RUN --init THIS_RUN"
                )
            answered = ", ".join(sorted(self.task.commands))
            raise InputError(f"`layerwise {command}` does not apply to a {self.task.name} run (it answers: {answered})")

    # Classification runs (and the explain/layers tools built on them) use these directly.
    @property
    def frontend(self):
        return self.task.frontend

    @property
    def class_names(self) -> list[str]:
        return self.task.class_names

    @property
    def modality(self) -> str:
        return self.task.modality

    def save(self, run_dir: Path) -> None:
        """Write config.json and model.safetensors into `run_dir` (each atomically)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        write_safetensors(run_dir / WEIGHTS_FILE, self.network.state_dict(), {"layerwise_version": __version__})
        write_json(run_dir / CONFIG_FILE, self.config)

    def predict(self, inputs: list[str | Path], k: int = 3, texts: list[str] | None = None, **options):
        """Predictions for files (paths, or folders searched recursively) and raw `texts`.

        Returns the predictions (objects with .to_json()) and the inputs that could not be used. `options`
        are the task's own (a transcribe run takes `language` and `beam_size`).
        """
        self.require("predict")
        return self.task.predict(self.network, inputs, texts=texts, k=k, **options)

    def find_inputs(self, inputs: list[str | Path], texts: list[str] | None = None):
        return self.task.find_inputs(inputs, texts)

    def labelled_examples(self, source):
        return self.task.labelled_examples(source)

    def generate(self, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, **options):
        """Continue `prompt` (generate runs): a `Generation` with .text and .to_json(). See `layerwise generate`."""
        self.require("generate")
        return self.task.generate(self.network, prompt, max_new_tokens, temperature, **options)

    def evaluate(self, data):
        """Metrics on held-out data in the task's own format, and the skipped inputs."""
        self.require("evaluate")
        return self.task.evaluate_data(self.network, data)

    # ------------------------------------------------------------------ distribution shift

    def shift(self, data, seed: int = 0):
        """Drift test of `data` against the run's validation reference: a `ShiftResult` and the skipped inputs."""
        self.require("shift")
        return self.task.detect_shift(self.network, data, seed=seed)

    def fit_shift_reference(self, data, run_dir: Path | None = None) -> int:
        """Calibrate and fit the shift reference on labelled held-out `data` (for runs that lack one).

        Written into `run_dir` (shift.safetensors, and the calibration in config.json) when given;
        returns the number of examples used.
        """
        self.require("shift")
        embedded = self.task.fit_reference_from(self.network, data)
        self.config.update(self.task.to_json())
        if run_dir is not None:
            for name, content in self.task.run_files().items():
                write_atomic(Path(run_dir) / name, content)
            write_json(Path(run_dir) / CONFIG_FILE, self.config)
        return len(embedded["embeddings"])

    def robustness(self, data, max_examples: int = 2000, seed: int = 0):
        """The metric under every corruption of the run's modality at 5 severities, and the skipped inputs."""
        self.require("robustness")
        return self.task.robustness(self.network, data, max_examples, seed)

    def adapt(self, data) -> dict:
        """Adapt the network in place to unlabelled `data` (test-time adaptation); returns what was done."""
        self.require("adapt")
        return self.task.adapt(self.network, data)


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
    from layerwise.tasks import task_from_config

    try:
        task = task_from_config(config)
        network = create_model(config["model"]["name"], **config["model"]["config"])
    except (KeyError, TypeError) as err:
        raise InputError(f"{config_path}: missing or malformed field {err}") from err
    load_weights(network, run_dir / WEIGHTS_FILE)
    load_run_files = getattr(task, "load_run_files", None)  # optional: e.g. RUN/shift.safetensors
    if load_run_files is not None:
        load_run_files(run_dir)
    network.to(resolve_device("auto"))
    return Model(network, task, config)


WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's and DistributedDataParallel's


def without_wrapper_prefixes(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved from a compiled or DDP-wrapped network (by other tools; layerwise saves the plain one)
    under the plain network's names."""
    stripped = True
    while stripped and weights:  # nested wrappers: `module._orig_mod.` (DDP around a compiled network)
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(name.startswith(prefix) for name in weights):
                weights = {name[len(prefix) :]: tensor for name, tensor in weights.items()}
                stripped = True
    return weights


def load_weights(network: nn.Module, path: Path) -> None:
    """Load safetensors weights, checking every tensor's presence, shape and dtype first."""
    if not path.is_file():
        raise InputError(f"{path}: not found")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path}: not a readable safetensors file ({err})") from err
    weights = without_wrapper_prefixes(weights)
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
