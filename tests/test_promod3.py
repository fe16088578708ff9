"""ProMod3's StructureDB read without ProMod3: a hand-built file, then Debian's promod3-data."""

import re
import struct
from pathlib import Path

import numpy as np
import pytest

from layerwise.data.promod3 import STRUCTURE_DB, read_structure_db
from layerwise.errors import InputError

needs_db = pytest.mark.skipif(
    not STRUCTURE_DB.is_file(), reason=f"needs {STRUCTURE_DB} from Debian's promod3-data package"
)
LDH_1A5Z = Path("/usr/share/doc/theseus/examples/ldh/1a5z_A.pdb.gz")  # Debian's theseus-examples
AMINO_ACIDS = set("ACDEFGHIKLMNPQRSTVWY")


def _raw_db(chains: list[tuple[str, str, str, np.ndarray, tuple[float, float, float]]]) -> bytes:
    """A StructureDB as StructureDB::Save lays it out, holding only the mandatory arrays.

    Each chain is (pdb id, chain name, sequence, (L, 4, 3) uint16 N/CA/C/O units, shift).
    """
    out = bytearray(struct.pack("<II11IIfBHQh", 1234, 2, 4, 4, 2, 8, 2, 6, 88, 40, 24, 6, 4, 1, 1.0, 1, 1, 1, 1))
    out += struct.pack("<iQ", 0, len(chains))  # stored_data 0: no optional arrays
    offset = 0
    for pdb_id, chain_name, sequence, _, shift in chains:
        for text in (pdb_id, chain_name):
            out += struct.pack("<I", len(text)) + text.encode()
        out += struct.pack("<IHHfff", offset, len(sequence), 1, *shift)
        offset += len(sequence)
    out += struct.pack("<Q", offset) + "".join(c[2] for c in chains).encode()
    out += struct.pack("<Q", offset) + b"".join(c[3].astype("<u2").tobytes() for c in chains)
    return bytes(out)


def _two_chains() -> bytes:
    units = np.arange(3 * 12, dtype=np.uint16).reshape(3, 4, 3) * 100
    return _raw_db([("1ABC", "A", "MKV", units, (1.0, -2.0, 0.5)), ("2XYZ", "B", "G", units[:1], (0.0, 0.0, 0.0))])


def test_decodes_hand_built_file(tmp_path):
    path = tmp_path / "db.dat"
    path.write_bytes(_two_chains())
    chains = list(read_structure_db(path))
    assert [(name, seq) for name, seq, _ in chains] == [("1abcA", "MKV"), ("2xyzB", "G")]
    ca = chains[0][2]
    assert ca.dtype == np.float32 and ca.shape == (3, 3)
    # CA is the second of N, CA, C, O; position = units * 0.01 A - shift
    expected = np.array([[3, 4, 5], [15, 16, 17], [27, 28, 29]], dtype=np.float32) - np.float32([1.0, -2.0, 0.5])
    np.testing.assert_allclose(ca, expected, atol=1e-5)
    assert len(list(read_structure_db(path, limit=1))) == 1


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[:-1], "truncated"),
        (lambda raw: raw[:100], "truncated"),
        (lambda raw: raw[:40], "too short"),
        (lambda raw: b"\x00" + raw[1:], "magic number"),
        (lambda raw: raw[:4] + struct.pack("<I", 3) + raw[8:], "version 3"),
        (lambda raw: raw[:8] + struct.pack("<I", 2) + raw[12:], "SavePortable"),
    ],
)
def test_damaged_file_is_an_input_error_naming_it(tmp_path, damage, message):
    path = tmp_path / "damaged.dat"
    path.write_bytes(damage(_two_chains()))
    with pytest.raises(InputError, match=message) as caught:
        read_structure_db(path)  # checked on the call, before any chain is yielded
    assert str(path) in str(caught.value)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_structure_db(tmp_path / "absent.dat")


@needs_db
def test_first_chains_of_debian_db_look_like_proteins():
    chains = list(read_structure_db(limit=50))
    assert len(chains) == 50
    assert chains[0][0] == "12asA" and chains[0][1].startswith("AYIAKQRQ")
    steps = []
    for name, sequence, ca in chains:
        assert re.fullmatch(r"[0-9][0-9a-z]{3}\w+", name), name
        assert set(sequence) <= AMINO_ACIDS, name
        assert ca.dtype == np.float32 and ca.shape == (len(sequence), 3) and np.isfinite(ca).all()
        steps.append(np.linalg.norm(np.diff(ca, axis=0), axis=1))
    step = np.concatenate(steps)
    # Consecutive CA-CA is 3.8 A for trans peptides, ~2.9 A for cis; the stored stretches have no gaps.
    assert 3.78 < np.median(step) < 3.83
    assert ((step >= 3.6) & (step <= 4.0)).mean() > 0.99
    assert step.min() > 2.5 and step.max() < 5.5


@needs_db
@pytest.mark.skipif(not LDH_1A5Z.is_file(), reason=f"needs {LDH_1A5Z} from Debian's theseus-examples package")
def test_matches_the_pdb_file_it_came_from():
    gemmi = pytest.importorskip("gemmi")
    _, sequence, ca = next(c for c in read_structure_db(limit=50) if c[0] == "1a5zA")
    structure = gemmi.read_structure(str(LDH_1A5Z))
    structure.setup_entities()
    residues = list(structure[0]["A"].get_polymer())
    start = gemmi.one_letter_code([r.name for r in residues]).find(sequence)
    assert start >= 0, "the stored stretch is a contiguous piece of the chain"
    pdb_ca = np.array([r.find_atom("CA", "*").pos.tolist() for r in residues[start : start + len(sequence)]])
    # Same frame as the PDB file, up to the 0.01 A storage step.
    assert np.abs(ca - pdb_ca).max() <= 0.0051
