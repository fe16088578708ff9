"""The fold task end to end: real structures in, a run, `fold`, `evaluate`, and the bad inputs of the issue."""

import gzip
import json
import math
import shutil
from pathlib import Path

import gemmi
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from layerwise.cli import app
from layerwise.data.promod3 import STRUCTURE_DB
from layerwise.data.protein_demo import THESEUS_EXAMPLES
from layerwise.data.similarity import identity
from layerwise.tasks import detect_task

pytestmark = pytest.mark.skipif(
    not (STRUCTURE_DB.is_file() and THESEUS_EXAMPLES.is_dir()), reason="needs promod3-data and theseus-examples"
)
CYTOCHROME_C = (
    "GDVEKGKKIFVQKCAQCHTVEKGGKHKTGPNLHGLFGRKTGQAPGFTYTDANKNKGITWKEETLMEYLENPKKYIPGTKMIFAGIKKKTEREDLIAYLKKATNE"
)


@pytest.fixture(scope="module")
def structures(tmp_path_factory) -> Path:
    """60 real database chains (Cα PDB files) and the theseus cytochromes (full-atom PDB files)."""
    from layerwise.data.promod3 import read_structure_db
    from layerwise.data.structures import write_ca_pdb

    root = tmp_path_factory.mktemp("structures")
    for family in ("cytochromes",):
        shutil.copytree(
            THESEUS_EXAMPLES / family, root / family, ignore=shutil.ignore_patterns("*.aln", "*.filemap", "README")
        )
    written = 0
    for name, sequence, ca in read_structure_db(limit=400):
        if 40 <= len(sequence) <= 120:
            write_ca_pdb(root / f"{name}.pdb", sequence, ca, np.zeros(len(sequence)))
            written += 1
        if written == 60:
            break
    return root


@pytest.fixture(scope="module")
def fold_run(structures, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fold") / "run"
    result = CliRunner().invoke(
        app, ["train", str(structures), "--out", str(run), "--model", "fold_xs", "--epochs", "2", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    return run


def test_the_task_is_detected_from_a_folder_of_structures(structures, fashion_train):
    assert detect_task(structures) == "fold"
    assert detect_task(fashion_train) == "classify"


@pytest.mark.slow
def test_packed_structures_train_to_the_weights_of_the_files(structures, fold_run, tmp_path):
    # `pack --task fold` reads the files and makes the identity split once; training from it is training on them.
    from safetensors.torch import load_file

    runner = CliRunner()
    result = runner.invoke(app, ["pack", str(structures), "--out", str(tmp_path / "packed")])  # task detected
    assert result.exit_code == 0, result.output
    args = ["--model", "fold_xs", "--epochs", "2", "--no-progress"]
    result = runner.invoke(app, ["train", str(tmp_path / "packed"), "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 0, result.output
    files, packed = (load_file(str(run / "model.safetensors")) for run in (fold_run, tmp_path / "run"))
    assert files.keys() == packed.keys() and all(torch.equal(files[k], packed[k]) for k in files)
    configs = [json.loads((run / "config.json").read_text())["data"] for run in (fold_run, tmp_path / "run")]
    assert configs[1]["packed_from"] == str(structures)
    for key in ("n_train", "n_val", "fingerprint", "split", "counts"):
        assert configs[0][key] == configs[1][key], key
    (tmp_path / "packed" / "val-chains.safetensors").write_bytes(b"damaged")
    result = runner.invoke(app, ["train", str(tmp_path / "packed"), "--out", str(tmp_path / "again"), *args])
    assert result.exit_code == 2 and "val-chains.safetensors" in result.output


@pytest.mark.slow
def test_training_writes_a_complete_run_with_a_leak_free_split(fold_run):
    summary = json.loads((fold_run / "metrics.json").read_text())
    config = json.loads((fold_run / "config.json").read_text())
    assert config["task"] == "fold" and config["modality"] == "protein"
    assert config["model"]["config"] == {"geometry_confidence": True}  # pLDDT reads the structure's geometry
    fit = summary["metrics"]["plddt_fit"]  # and its head was fitted again on whole training chains
    assert fit["chains"] == min(400, config["data"]["n_train"]) and fit["loss_after"] < fit["loss_before"]
    metrics = summary["metrics"]
    for key in ("lddt_ca", "rmsd", "gdt_ts", "tm_score", "plddt_pearson"):
        assert key in metrics
    assert 0 <= metrics["lddt_ca"] <= 1 and metrics["rmsd"] >= 0
    for name in ("template", "helix"):
        assert 0 <= summary["baseline"][name]["lddt_ca"] <= 1
    assert "lDDT-Cα" in summary["verdict"]
    split = config["data"]["split"]
    assert split["max_cross_identity"] <= split["max_identity"] == 0.3
    assert config["data"]["n_val"] >= 1 and config["data"]["counts"]["duplicates"] >= 0
    assert (fold_run / "templates.safetensors").is_file()
    report = (fold_run / "report.html").read_text()
    assert "Superposed" in report and "pLDDT" in report


@pytest.mark.slow
def test_fold_writes_a_pdb_that_reads_back_with_plddt_as_b_factor(fold_run, tmp_path):
    fasta = tmp_path / "query.fasta"
    fasta.write_text(f">cytc some description\n{CYTOCHROME_C[:50]}\n{CYTOCHROME_C[50:]}\n")
    out = tmp_path / "folds"
    result = CliRunner().invoke(
        app, ["fold", str(fold_run), str(fasta), "MKTAYIAKQRQISFVKSHFSRQ", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["name"] for line in lines] == ["cytc", "sequence_1"]
    assert set(lines[0]) == {"name", "sequence", "plddt_mean", "pdb"}
    structure = gemmi.read_structure(lines[0]["pdb"])
    residues = list(structure[0][0])
    assert len(residues) == len(CYTOCHROME_C)
    assert gemmi.one_letter_code([r.name for r in residues]).upper() == CYTOCHROME_C
    b_factors = np.array([r[0].b_iso for r in residues])
    assert all(r[0].name == "CA" for r in residues) and ((b_factors >= 0) & (b_factors <= 100)).all()
    assert math.isclose(b_factors.mean(), lines[0]["plddt_mean"], abs_tol=0.05)
    steps = np.linalg.norm(np.diff([r[0].pos.tolist() for r in residues], axis=0), axis=1)
    assert np.isfinite(steps).all()
    assert (out / "cytc.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_fold_names_a_bad_letter_and_refuses_an_overlong_sequence(fold_run, tmp_path):
    fasta = tmp_path / "bad.fasta"
    fasta.write_text(">broken\nMKTAYI1AKQ\n")
    result = CliRunner().invoke(app, ["fold", str(fold_run), str(fasta)])
    assert result.exit_code == 2
    assert "broken" in result.output and "position 7" in result.output and "'1'" in result.output
    result = CliRunner().invoke(app, ["fold", str(fold_run), "A" * 1500, "MKTAYIAKQRQISFVKSHFSRQ", "--json"])
    assert result.exit_code == 2
    assert "1500 residues" in result.output
    assert json.loads(result.stdout.splitlines()[-1])["name"] == "sequence_1"  # the other one was folded


@pytest.mark.slow
def test_evaluate_prints_structure_metrics_beside_both_baselines(fold_run, structures, tmp_path):
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    shutil.copy(THESEUS_EXAMPLES / "ldh" / "1a5z_A.pdb.gz", held_out)
    (held_out / "page.pdb").write_text("<html><body>Not Found</body></html>")
    (held_out / "empty.cif").write_bytes(b"")
    (held_out / "cut.pdb.gz").write_bytes(gzip.compress(b"ATOM      1  CA  ALA A   1")[:20])
    result = CliRunner().invoke(app, ["evaluate", str(fold_run), str(held_out), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    for key in ("lddt_ca", "rmsd", "gdt_ts", "tm_score"):
        assert key in metrics and key in metrics["baseline"]["template"] and key in metrics["baseline"]["helix"]
    assert metrics["n_chains"] == 1 and metrics["skipped"] == 3
    for name in ("page.pdb", "empty.cif", "cut.pdb.gz"):
        assert name in result.output


def test_nothing_usable_is_a_clear_error(tmp_path):
    data = tmp_path / "junk"
    data.mkdir()
    (data / "a.pdb").write_text("<html>404</html>")
    (data / "b.cif").write_text("")
    result = CliRunner().invoke(app, ["train", str(data), "--task", "fold", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "a.pdb" in result.output and "b.cif" in result.output


def test_predictions_do_not_depend_on_the_frame_of_the_training_targets(structures):
    """Training on rotated and translated targets gives the same network: every loss term is frame-free."""
    from layerwise.data.crops import ChainBatches
    from layerwise.data.structures import read_structures
    from layerwise.models.registry import create_model
    from layerwise.tasks.fold import FoldTask

    chains, _, _ = read_structures(sorted(structures.glob("*.pdb"))[:4])
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(3)))[0]
    rotation = rotation * torch.linalg.det(rotation)  # a proper rotation: a mirror would change the fold's hand
    networks = []
    for rotate in (False, True):
        torch.manual_seed(0)
        network = create_model("fold_xs")
        optimiser = torch.optim.Adam(network.parameters(), lr=1e-3)
        for (tokens, residue_mask), (coords, coord_mask) in ChainBatches(chains, 2, 64, shuffle=True).epoch(0):
            if rotate:
                coords = coords @ rotation.T + torch.tensor([30.0, -12.0, 5.0])
            loss, _ = FoldTask().loss(network, (tokens, residue_mask), (coords, coord_mask))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        networks.append(network)
    query = [(c.name, c.sequence) for c in chains[:2]]
    first, second = (FoldTask().fold_sequences(n, query) for n in networks)
    for a, b in zip(first, second, strict=True):
        da = np.linalg.norm(a.coords[:, None] - a.coords[None], axis=-1)
        db = np.linalg.norm(b.coords[:, None] - b.coords[None], axis=-1)
        assert np.allclose(da, db, atol=1e-2)
        assert np.allclose(a.plddt, b.plddt, atol=1e-2)


def test_templates_round_trip_through_safetensors(structures):
    from layerwise.data.structures import read_structures
    from layerwise.tasks.fold import templates_from_bytes, templates_to_bytes

    chains, _, _ = read_structures(structures / "cytochromes")
    back = templates_from_bytes(templates_to_bytes(chains))
    assert [c.name for c in back] == [c.name for c in chains]
    for a, b in zip(chains, back, strict=True):
        assert a.sequence == b.sequence and np.array_equal(a.ca, b.ca) and np.array_equal(a.mask, b.mask)


def test_the_demo_filter_finds_relatives_across_sets():
    """similar_pairs (the demo's filter) links a cytochrome c to its relative and not to an unrelated chain."""
    from layerwise.data.similarity import similar_pairs

    relative = CYTOCHROME_C[:30] + "A" + CYTOCHROME_C[31:70] + "L" + CYTOCHROME_C[71:]
    unrelated = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKR"
    pairs = similar_pairs([CYTOCHROME_C], [unrelated, relative])
    assert (0, 1) in pairs and (0, 0) not in pairs
    assert identity(CYTOCHROME_C, relative) > 0.9 and identity(CYTOCHROME_C, unrelated) < 0.3


def test_the_plddt_head_is_fitted_on_whole_chains_and_nothing_else_moves(monkeypatch) -> None:
    import layerwise.tasks.fold_confidence as fold_confidence
    from layerwise.data.structures import read_structures
    from layerwise.models import create_model

    chains, _, _ = read_structures(THESEUS_EXAMPLES / "cytochromes")
    torch.manual_seed(0)
    network = create_model("fold_xs", geometry_confidence=True)
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    monkeypatch.setattr(fold_confidence, "FIT_STEPS", 200)
    monkeypatch.setattr(fold_confidence, "FIT_EPOCHS", 1000)  # ~800 residues: 60 passes would be 47 steps
    fit = fold_confidence.fit_confidence(network, chains)

    assert fit["chains"] == len(chains) and fit["residues"] > 90 * len(chains) and fit["steps"] == 200
    assert fit["loss_after"] < fit["loss_before"] - 0.5  # from a random head: the lDDT of its own structures is learnt
    changed = {name for name, p in network.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if name.startswith(("confidence.", "geometry_projection."))}
    assert all(p.grad is None for p in network.parameters())
    kept = {name: p.detach().clone() for name, p in network.named_parameters()}
    assert fold_confidence.fit_confidence(network, [])["steps"] == 0  # nothing to fit on: the head stays as it is
    assert all(torch.equal(p, kept[name]) for name, p in network.named_parameters())
