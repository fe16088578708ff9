"""Protein structure files: real PDB files (theseus-examples), broken and odd files, the Cα writer, FASTA."""

import gzip
import shutil
from pathlib import Path

import gemmi
import numpy as np
import pytest

from layerwise.data.structures import (
    MIN_RESIDUES,
    encode_sequence,
    read_fasta,
    read_structures,
    write_ca_pdb,
)
from layerwise.errors import InputError

EXAMPLES = Path("/usr/share/doc/theseus/examples")  # Debian package theseus-examples (scripts/setup.sh)
needs_examples = pytest.mark.skipif(not EXAMPLES.is_dir(), reason="theseus-examples is not installed")
NMR_WITH_DNA = EXAMPLES / "1s40.pdb.gz"  # 10 models; chain A protein (SEQRES 199, modelled 5-191), chain B ssDNA


def _helix_pdb(path: Path, sequence: str) -> Path:
    """A Cα-only chain written by write_ca_pdb (itself tested below)."""
    n = np.arange(len(sequence))
    ca = np.stack([2.3 * np.cos(np.radians(100 * n)), 2.3 * np.sin(np.radians(100 * n)), 1.5 * n], axis=1)
    return write_ca_pdb(path, sequence, ca, np.full(len(sequence), 50.0))


def _reasons(problems, name: str) -> list[str]:
    return [p.reason for p in problems if Path(p.origin).name == name]


@needs_examples
def test_nmr_file_gives_the_protein_chain_of_the_first_model_with_seqres_gaps_masked():
    chains, problems, counts = read_structures(NMR_WITH_DNA)
    assert problems == []
    assert counts["skipped_nucleic"] == 1 and counts["chains"] == 1
    (chain,) = chains
    assert chain.name == "1s40.pdb.gz:A" and chain.origin == str(NMR_WITH_DNA)
    assert len(chain.sequence) == 199  # SEQRES, not just the 187 modelled residues
    assert chain.sequence.startswith("MRMSKMARKD")
    assert chain.mask.sum() == 187
    assert not chain.mask[:4].any() and chain.mask[4]  # residues 1-4 are not in the model
    assert np.all(chain.ca[~chain.mask] == 0)
    # Model 1's Cα of LYS 5 (the file's second ATOM line), not any later model's.
    np.testing.assert_allclose(chain.ca[4], [24.731, -11.092, -3.669], atol=1e-3)
    assert chain.ca.dtype == np.float32 and chain.mask.dtype == bool


@needs_examples
def test_mmcif_and_gzipped_mmcif_read_the_same_chain_as_pdb(tmp_path):
    structure = gemmi.read_structure(str(NMR_WITH_DNA))
    structure.setup_entities()
    document = structure.make_mmcif_document()
    document.write_file(str(tmp_path / "1s40.cif"))
    (tmp_path / "1s40.cif.gz").write_bytes(gzip.compress((tmp_path / "1s40.cif").read_bytes()))
    (pdb,), _, _ = read_structures(NMR_WITH_DNA)
    for name in ("1s40.cif", "1s40.cif.gz"):
        (chain,), problems, counts = read_structures(tmp_path / name)
        assert problems == [] and counts["skipped_nucleic"] == 1
        assert chain.sequence == pdb.sequence
        assert np.array_equal(chain.mask, pdb.mask)
        np.testing.assert_allclose(chain.ca, pdb.ca, atol=1e-3)


@needs_examples
def test_old_format_files_with_line_numbers_and_junk_elements_are_read():
    # ASTRAL domains put a line number in columns 77-80 (where a charge belongs) and a blank
    # chain id; 1BBR_K has "N20"-style junk in the element columns.
    chains, problems, _ = read_structures(EXAMPLES / "cytochromes")
    assert problems == []
    assert len(chains) >= 8 and all(len(c.sequence) >= 100 for c in chains)
    assert any(c.name.endswith(":_") for c in chains)  # blank chain id
    (trypsin,), problems, _ = read_structures(EXAMPLES / "trypsins" / "1BBR_K.pdb.gz")
    assert problems == [] and trypsin.mask.sum() == 259


@needs_examples
def test_a_missing_loop_without_seqres_is_filled_with_masked_unknown_residues():
    # 1ez4_A has no SEQRES and an unmodelled active-site loop: residues are numbered across it.
    (chain,), _, _ = read_structures(EXAMPLES / "ldh" / "1ez4_A.pdb.gz")
    gap = [i for i, letter in enumerate(chain.sequence) if letter == "X"]
    assert gap and not chain.mask[gap].any()
    bonded = chain.mask[1:] & chain.mask[:-1]
    steps = np.linalg.norm(np.diff(chain.ca, axis=0), axis=1)[bonded]
    assert steps.max() < 4.5  # every remaining neighbour pair is a real bond
    assert steps.min() > 2.5


@needs_examples
def test_identical_sequences_are_kept_once_and_counted(tmp_path):
    for name in ("a.pdb.gz", "b.pdb.gz"):
        shutil.copy(NMR_WITH_DNA, tmp_path / name)
    chains, problems, counts = read_structures(tmp_path)
    assert [c.name for c in chains] == ["a.pdb.gz:A"]
    assert counts["duplicates"] == 1 and counts["files"] == 2 and problems == []


def test_broken_files_become_problems_and_reading_goes_on(tmp_path):
    good = _helix_pdb(tmp_path / "good.pdb", "ACDEFGHIKLMNPQRSTVWY" * 2)
    (tmp_path / "page.pdb").write_text("<html><body>404 Not Found</body></html>\n")
    (tmp_path / "empty.cif").write_bytes(b"")
    (tmp_path / "cut.pdb.gz").write_bytes(gzip.compress(good.read_bytes())[:-30])
    (tmp_path / "noise.cif").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "notes.txt").write_text("not a structure; ignored when reading a folder\n")
    chains, problems, counts = read_structures(tmp_path)
    assert [c.name for c in chains] == ["good.pdb:A"]
    assert counts["files"] == 5
    assert "no atoms" in _reasons(problems, "page.pdb")[0]
    assert "empty" in _reasons(problems, "empty.cif")[0]
    assert "ended before the end-of-stream" in _reasons(problems, "cut.pdb.gz")[0]
    assert _reasons(problems, "noise.cif")
    assert len(problems) == 4


def test_nucleic_water_only_and_short_chains_are_skipped_and_counted(tmp_path):
    dna = "".join(
        f"ATOM  {i + 1:5d}  P    DA B{i + 1:4d}    {3.0 * i:8.3f}{0.0:8.3f}{0.0:8.3f}  1.00 20.00           P\n"
        for i in range(12)
    )
    (tmp_path / "dna.pdb").write_text(dna + "END\n")
    waters = "".join(
        f"HETATM{i + 1:5d}  O   HOH W{i + 1:4d}    {3.0 * i:8.3f}{5.0:8.3f}{0.0:8.3f}  1.00 20.00           O\n"
        for i in range(30)
    )
    (tmp_path / "water.pdb").write_text(waters + "END\n")
    _helix_pdb(tmp_path / "peptide.pdb", "GSHMKLV")
    chains, problems, counts = read_structures(tmp_path)
    assert chains == []
    assert counts["skipped_nucleic"] == 1 and counts["skipped_hetero"] == 1 and counts["skipped_short"] == 1
    assert "1 nucleic" in _reasons(problems, "dna.pdb")[0]
    assert "1 hetero" in _reasons(problems, "water.pdb")[0]
    assert f"at least {MIN_RESIDUES}" in _reasons(problems, "peptide.pdb")[0]


@pytest.mark.parametrize("with_seqres", [True, False])
def test_selenomethionine_is_read_as_methionine_and_unknown_residues_as_x(tmp_path, with_seqres):
    path = _helix_pdb(tmp_path / "mse.pdb", "ACDEFGHIKLMNPQRSTVWYAC")
    lines = path.read_text().splitlines(keepends=True)
    atoms = [i for i, line in enumerate(lines) if line.startswith("ATOM")]
    lines[atoms[10]] = "HETATM" + lines[atoms[10]][6:17] + "MSE" + lines[atoms[10]][20:]  # M -> MSE
    lines[atoms[3]] = lines[atoms[3]][:17] + "ZZZ" + lines[atoms[3]][20:]  # E -> a name nobody knows
    seqres = [line.replace(" MET ", " MSE ").replace(" GLU ", " ZZZ ") for line in lines if line.startswith("SEQRES")]
    others = [line for line in lines if not line.startswith("SEQRES")]
    path.write_text("".join((seqres if with_seqres else []) + others))
    (chain,), problems, _ = read_structures(path)
    assert problems == []
    assert chain.sequence == "ACDXFGHIKLMNPQRSTVWYAC"
    assert chain.mask.all()


def test_written_ca_pdb_reads_back_with_gemmi_and_read_structures(tmp_path):
    rng = np.random.default_rng(0)
    sequence = "MKTAYIAKQRQISFVKSHFSRQX"
    ca = rng.normal(0, 20, (len(sequence), 3)).astype(np.float32)
    plddt = rng.uniform(0, 100, len(sequence))
    path = write_ca_pdb(tmp_path / "pred.pdb", sequence, ca, plddt, chain_id="B")
    (chain,), problems, _ = read_structures(path)
    assert problems == [] and chain.name == "pred.pdb:B"
    assert chain.sequence == sequence and chain.mask.all()
    np.testing.assert_allclose(chain.ca, ca, atol=1e-3)
    residues = gemmi.read_structure(str(path))[0]["B"]
    assert [r.name for r in residues][:3] == ["MET", "LYS", "THR"] and residues[len(sequence) - 1].name == "UNK"
    np.testing.assert_allclose([r["CA"][0].b_iso for r in residues], plddt, atol=0.006)  # PDB keeps 2 decimals


def test_write_ca_pdb_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError, match="lengths differ"):
        write_ca_pdb(tmp_path / "x.pdb", "ACD", np.zeros((2, 3)), np.zeros(3))


def test_a_missing_path_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_structures(tmp_path / "absent")


def test_encode_sequence_maps_unknown_letters_to_20():
    assert encode_sequence("ACDY").tolist() == [0, 1, 2, 19]
    assert encode_sequence("XzB*").tolist() == [20, 20, 20, 20]
    assert encode_sequence("acd").tolist() == [0, 1, 2]
    assert encode_sequence("ACD").dtype == np.int64


def test_read_fasta_records_raw_sequences_and_rare_letters(tmp_path):
    text = ">first protein one\nMKV\nlla\n>second\nACUOBZJX*\n"
    assert read_fasta(text) == [("first", "MKVLLA"), ("second", "ACCKXXXX")]
    assert read_fasta("mkv lla\n") == [("sequence_1", "MKVLLA")]
    path = tmp_path / "q.fasta"
    path.write_text(text)
    assert read_fasta(path) == read_fasta(str(path)) == read_fasta(text)


def test_read_fasta_names_the_record_position_and_letter_it_rejects(tmp_path):
    with pytest.raises(InputError, match=r"record 'second', position 3: '1'"):
        read_fasta(">first\nMKV\n>second\nMK1V\n")
    with pytest.raises(InputError, match=r"position 4: '-'"):
        read_fasta(">aligned\nMKV-A\n")
    with pytest.raises(InputError, match="no sequence"):
        read_fasta(">empty\n>full\nMKV\n")
    with pytest.raises(InputError, match="no sequence"):
        read_fasta("  \n")
    path = tmp_path / "bad.fa"
    path.write_text(">x\nMKJ?\n")
    with pytest.raises(InputError, match=str(path)):
        read_fasta(path)
