"""`layerwise export` of a fold run: an ONNX file that folds a sequence with onnxruntime and numpy alone."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from layerwise.cli import app
from layerwise.data.promod3 import STRUCTURE_DB

pytestmark = pytest.mark.skipif(not STRUCTURE_DB.is_file(), reason="needs promod3-data")
ALPHABET = "ACDEFGHIKLMNPQRSTVWY"  # as the spec's decoding says: X (and any other letter) is 20, padding 21
RARE = {"U": "C", "O": "K", "B": "X", "Z": "X", "J": "X"}
UNKNOWN, PAD = 20, 21


@pytest.fixture(scope="module")
def structures(tmp_path_factory) -> Path:
    """16 real database chains of 40-90 residues, as Cα PDB files (test_fold's data, smaller)."""
    from layerwise.data.promod3 import read_structure_db
    from layerwise.data.structures import write_ca_pdb

    root = tmp_path_factory.mktemp("structures")
    chains = (c for c in read_structure_db(limit=400) if 40 <= len(c[1]) <= 90)
    for _, (name, sequence, ca) in zip(range(16), chains, strict=False):
        write_ca_pdb(root / f"{name}.pdb", sequence, ca, np.zeros(len(sequence)))
    return root


@pytest.fixture(scope="module")
def fold_run(structures, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fold") / "run"
    args = ["train", str(structures), "--out", str(run), "--model", "fold_xs", "--epochs", "2", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return run


def numpy_only_fold(model_file: Path, sequences: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The spec's decoding with numpy and onnxruntime, no layerwise: (Cα coordinates, pLDDT) per sequence,
    all of them in one padded batch."""
    import onnxruntime

    length = max(len(s) for s in sequences)
    tokens = np.full((len(sequences), length), PAD, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        letters = "".join(RARE.get(ch, ch) for ch in sequence.upper().removesuffix("*"))
        tokens[row, : len(letters)] = [ALPHABET.index(ch) if ch in ALPHABET else UNKNOWN for ch in letters]
    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    coords, plddt_logits, _ = session.run(None, {"tokens": tokens, "residue_mask": tokens != PAD})
    probabilities = np.exp(plddt_logits - plddt_logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    bins = plddt_logits.shape[-1]
    plddt = 100 * (probabilities * (np.arange(bins) + 0.5) / bins).sum(-1)
    return [(coords[row, : len(s)], plddt[row, : len(s)]) for row, s in enumerate(sequences)]


@pytest.mark.slow
def test_a_fold_run_exports_and_folds_without_layerwise(cli, fold_run, structures, tmp_path) -> None:
    import layerwise
    from layerwise.data.structures import read_structures

    out = tmp_path / "fold.onnx"
    code, stdout, err = cli("export", fold_run, "--out", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["max_abs_difference"] <= 1e-4 and str(structures) in result["parity_inputs"]
    spec = json.loads((tmp_path / "fold.onnx.json").read_text())
    (graph,) = spec["graphs"]
    assert graph["file"] == "fold.onnx" and graph["outputs"] == ["coords", "plddt_logits", "distogram_logits"]
    assert [(x["name"], x["shape"], x["dtype"]) for x in graph["inputs"]] == [
        ("tokens", ["batch", "length"], "int64"),
        ("residue_mask", ["batch", "length"], "bool"),
    ]
    assert f"'{ALPHABET}'" in spec["decoding"] and f"padding is {PAD}" in spec["decoding"]
    assert "(arange(50) + 0.5) / 50" in spec["decoding"] and "up to 1000 residues" in spec["decoding"]

    # Two real chains of different lengths, one batch: the shorter one is padded.
    chains, _, _ = read_structures(structures)
    sequences = [chains[0].sequence, chains[-1].sequence.lower()]
    assert len(sequences[0]) != len(sequences[1])
    expected, _ = layerwise.load(fold_run).predict(sequences)
    for (coords, plddt), want in zip(numpy_only_fold(out, sequences), expected, strict=True):
        assert coords.shape == want.coords.shape and np.abs(coords - want.coords).max() <= 1e-3  # Å
        assert np.abs(plddt - want.plddt).max() <= 1e-3
    # What `layerwise fold --json` prints is the mean of that pLDDT.
    code, stdout, _ = cli("fold", fold_run, sequences[0], "--json")
    assert code == 0
    plddt_mean = json.loads(stdout)["plddt_mean"]
    assert abs(plddt_mean - numpy_only_fold(out, sequences[:1])[0][1].mean()) <= 0.006
