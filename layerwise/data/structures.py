"""Read protein chains from PDB and mmCIF files (with gemmi), write predicted Cα traces, read FASTA.

One polymer chain of a file's first model is one example: its amino-acid sequence and the Cα
position of each residue (missing atoms are masked out, never invented). What cannot be used is
counted by kind (nucleic-acid, short, Cα-less and ligand/water-only chains, duplicate sequences),
and a file that yields no protein chain at all becomes a `Problem` naming it, so nothing is dropped
silently and a broken file never stops the reading of the others.

Residues missing from the model: where the file gives the deposited sequence (SEQRES in PDB,
entity_poly_seq in mmCIF), gemmi aligns it to the modelled residues (`assign_label_seq_id`) and the
chain is the full sequence, with mask False where no Cα was modelled. Without it, the chain is the
modelled residues, plus unknown residues ("X", mask False) filling each gap where the Cα trace
breaks (consecutive Cα over CHAIN_BREAK apart): as many as the residue numbers skip, but at least
as many as the gap's length needs at 3.8 Å a residue. Numbering alone would invent residues in
files with insertion-code schemes (chymotrypsin numbering in trypsins), and geometry alone gives
only a lower bound.
"""

from __future__ import annotations

import gzip
import io
import math
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np
from Bio.SeqIO.FastaIO import SimpleFastaParser

from layerwise.data.shards import refuse_pack
from layerwise.data.sources import Problem
from layerwise.errors import InputError

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
UNKNOWN = "X"
UNKNOWN_INDEX = len(AMINO_ACIDS)  # encode_sequence's code for X and anything else
# Selenocysteine and pyrrolysine are read as their closest standard residue; ambiguity codes
# (Asx, Glx, Leu/Ile) as unknown. The same rule applies to FASTA input and to structure files.
RARE_LETTERS = {"U": "C", "O": "K", "B": UNKNOWN, "Z": UNKNOWN, "J": UNKNOWN}
STRUCTURE_EXTENSIONS = tuple(ext + gz for ext in (".pdb", ".ent", ".cif", ".mmcif") for gz in ("", ".gz"))
MMCIF_EXTENSIONS = (".cif", ".mmcif")
MIN_RESIDUES = 20  # chains with fewer observed Cα are peptides, too small to learn a fold from
# PDB columns 79-80 are a formal charge we never use; files from older software (ASTRAL/SCOP
# domains among them) put line numbers there, which gemmi rejects as a charge.
PDB_LINE_LENGTH = 78
CA_STEP = 3.8  # Å between bonded Cα (2.9 for a rare cis peptide)
CHAIN_BREAK = 4.5  # Å: consecutive Cα farther apart are not bonded (poorly refined bonds reach ~4.3)
COUNT_KEYS = (
    "files",  # structure files read (including those that became a Problem)
    "chains",  # protein chains kept
    "skipped_nucleic",  # DNA / RNA chains
    "skipped_short",  # protein chains with fewer than MIN_RESIDUES observed Cα
    "skipped_no_ca",  # protein chains without a single Cα (e.g. a trace of other atoms)
    "skipped_hetero",  # chains holding only ligands, ions or waters (or an unrecognised polymer)
    "duplicates",  # protein chains whose sequence equals one already kept (the first is kept)
)
_PEPTIDES = (gemmi.PolymerType.PeptideL, gemmi.PolymerType.PeptideD)
_NUCLEIC = (gemmi.PolymerType.Dna, gemmi.PolymerType.Rna, gemmi.PolymerType.DnaRnaHybrid)
_THREE_LETTER = dict(
    zip(
        AMINO_ACIDS + UNKNOWN,
        gemmi.expand_one_letter_sequence(AMINO_ACIDS + UNKNOWN, gemmi.ResidueKind.AA),
        strict=True,
    )
)


@dataclass(frozen=True, eq=False)
class ProteinChain:
    """One protein chain: its sequence and where each residue's Cα is (if it was observed)."""

    name: str  # "<file name>:<chain id>", e.g. "1abc.pdb:A"; "_" stands for a blank chain id
    origin: str  # the file it came from
    sequence: str  # one letter per residue, from AMINO_ACIDS or X
    ca: np.ndarray  # float32 (L, 3), Å; zeros where mask is False
    mask: np.ndarray  # bool (L,): True where the residue's Cα is in the model

    def __post_init__(self) -> None:
        if not len(self.sequence) == len(self.ca) == len(self.mask):
            raise ValueError(f"{self.name}: sequence, ca and mask lengths differ")


def encode_sequence(sequence: str) -> np.ndarray:
    """int64 (L,): the index of each letter in AMINO_ACIDS; X and any other letter are UNKNOWN_INDEX."""
    table = np.full(128, UNKNOWN_INDEX, dtype=np.int64)
    table[np.frombuffer(AMINO_ACIDS.encode(), dtype=np.uint8)] = np.arange(len(AMINO_ACIDS))
    codes = np.frombuffer(sequence.upper().encode("ascii", errors="replace"), dtype=np.uint8)
    return table[np.minimum(codes, 127)]


def structure_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """The structure files named, and those under named folders (recursively, sorted).

    A named file is taken whatever its extension; a missing path raises InputError."""
    found: list[Path] = []
    for path in [paths] if isinstance(paths, str | Path) else paths:
        path = Path(path)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(STRUCTURE_EXTENSIONS))
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    return found


def read_structures(
    paths: str | Path | Iterable[str | Path],
) -> tuple[list[ProteinChain], list[Problem], dict[str, int]]:
    """Every usable protein chain in the structure files under `paths`, the files that gave none
    (each a Problem with the reason), and the COUNT_KEYS counts. Only the first model is read
    (NMR ensembles hold many). Duplicate sequences are counted, not reported as problems: a
    homodimer's second chain or a re-deposited protein is normal, and keeping it would put the
    same protein on both sides of a train/validation split."""
    if isinstance(paths, (str, Path)):
        refuse_pack(Path(paths))
    chains: list[ProteinChain] = []
    problems: list[Problem] = []
    counts = dict.fromkeys(COUNT_KEYS, 0)
    seen: set[str] = set()
    for path in structure_files(paths):
        counts["files"] += 1
        try:
            structure = _read_structure(path)
        except (ValueError, RuntimeError, OSError, EOFError, zlib.error) as error:
            problems.append(Problem(origin=str(path), reason=f"not a readable structure file: {error}"))
            continue
        found, skipped = _protein_chains(structure, path)
        for key, n in skipped.items():
            counts[key] += n
        if not found:
            problems.append(Problem(origin=str(path), reason=_nothing_found(structure, skipped)))
        for chain in found:
            if chain.sequence in seen:
                counts["duplicates"] += 1
                continue
            seen.add(chain.sequence)
            chains.append(chain)
    counts["chains"] = len(chains)
    return chains, problems, counts


def write_ca_pdb(path: str | Path, sequence: str, ca: np.ndarray, plddt: np.ndarray, chain_id: str = "A") -> Path:
    """Write a Cα-only PDB file: one CA atom per residue, the residue's three-letter name (UNK for
    X), and pLDDT (0-100) in the B-factor column, where structure viewers colour by confidence."""
    ca = np.asarray(ca, dtype=np.float64)
    plddt = np.asarray(plddt, dtype=np.float64)
    if not len(sequence) == len(ca) == len(plddt):
        raise ValueError(f"sequence ({len(sequence)}), ca ({len(ca)}) and plddt ({len(plddt)}) lengths differ")
    chain = gemmi.Chain(chain_id)
    for index, (letter, position, confidence) in enumerate(zip(sequence, ca, plddt, strict=True)):
        residue = gemmi.Residue()
        residue.name = _THREE_LETTER.get(letter, "UNK")
        residue.seqid = gemmi.SeqId(index + 1, " ")
        residue.entity_type = gemmi.EntityType.Polymer
        atom = gemmi.Atom()
        atom.name, atom.element = "CA", gemmi.Element("C")
        atom.pos = gemmi.Position(*position)
        atom.occ, atom.b_iso = 1.0, float(confidence)
        residue.add_atom(atom)
        chain.add_residue(residue)
    model = gemmi.Model("1")
    model.add_chain(chain)
    structure = gemmi.Structure()
    structure.add_model(model)
    structure.setup_entities()
    # SEQRES makes the file self-describing: read back, no Cα gap can be mistaken for missing residues.
    structure.entities[0].full_sequence = [residue.name for residue in chain]
    path = Path(path)
    structure.write_pdb(str(path))
    return path


def read_fasta(text_or_path: str | Path) -> list[tuple[str, str]]:
    """(name, sequence) records from FASTA text or a FASTA file; a bare sequence (no ">") is one
    record, "sequence_1". Letters may be lower case; U, O, B, Z and J follow RARE_LETTERS; a final
    "*" (stop) is dropped. Anything else raises InputError naming the record, position and letter."""
    origin, text = _fasta_text(text_or_path)
    if not text.strip():
        raise InputError(f"{origin}: no sequence")
    if not text.lstrip().startswith(">"):
        records = [("sequence_1", "".join(text.split()))]
    else:
        records = [
            (title.split()[0] if title.split() else "", sequence)
            for title, sequence in SimpleFastaParser(io.StringIO(text))
        ]
    return [(name, _check_sequence(origin, name, sequence)) for name, sequence in records]


def _fasta_text(text_or_path: str | Path) -> tuple[str, str]:
    if isinstance(text_or_path, Path) or ("\n" not in text_or_path and _is_file(text_or_path)):
        path = Path(text_or_path)
        try:
            return str(path), path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"{path}: cannot read FASTA: {error}") from error
    return "sequence input", text_or_path


def _is_file(name: str) -> bool:
    try:
        return Path(name).is_file()
    except OSError:  # a raw sequence longer than a file name may be
        return False


def _check_sequence(origin: str, name: str, sequence: str) -> str:
    letters = sequence.upper().removesuffix("*")
    for position, letter in enumerate(letters, start=1):
        if letter not in AMINO_ACIDS and letter != UNKNOWN and letter not in RARE_LETTERS:
            raise InputError(
                f"{origin}: record {name!r}, position {position}: {letter!r} is not an amino-acid letter "
                f"({AMINO_ACIDS}, X, or U/O/B/Z/J)"
            )
    if not letters:
        raise InputError(f"{origin}: record {name!r} has no sequence")
    return "".join(RARE_LETTERS.get(letter, letter) for letter in letters)


def _read_structure(path: Path) -> gemmi.Structure:
    """Parse with gemmi; a .gz is decompressed here because gemmi reads a truncated gzip without
    complaint, as the part that arrived."""
    data = path.read_bytes()
    name = path.name.lower()
    if name.endswith(".gz"):
        data, name = gzip.decompress(data), name.removesuffix(".gz")
    if not data.strip():
        raise ValueError("empty file")
    if name.endswith(MMCIF_EXTENSIONS):
        structure = gemmi.read_structure_string(data, format=gemmi.CoorFormat.Mmcif)
    else:
        structure = gemmi.read_pdb_string(data, max_line_length=PDB_LINE_LENGTH)
    structure.setup_entities()
    structure.assign_label_seq_id(False)  # aligns SEQRES to the model where the file did not
    return structure


def _protein_chains(structure: gemmi.Structure, path: Path) -> tuple[list[ProteinChain], Counter]:
    found: list[ProteinChain] = []
    skipped: Counter = Counter()
    if len(structure) == 0:
        return found, skipped
    modified = {mod.mod_id: mod.parent_comp_id for mod in structure.mod_residues}  # MODRES: e.g. MSE -> MET
    for chain in structure[0]:
        polymer = chain.get_polymer()
        kind = polymer.check_polymer_type() if len(polymer) else None
        if kind in _NUCLEIC:
            skipped["skipped_nucleic"] += 1
            continue
        if kind not in _PEPTIDES:
            skipped["skipped_hetero"] += 1
            continue
        entity = structure.get_entity_of(polymer)
        full = list(entity.full_sequence) if entity is not None else []
        sequence, ca, mask = (
            _from_entity(polymer, full, modified) if _aligned(polymer, full) else _from_model(polymer, modified)
        )
        if not mask.any():
            skipped["skipped_no_ca"] += 1
        elif mask.sum() < MIN_RESIDUES:
            skipped["skipped_short"] += 1
        else:
            found.append(ProteinChain(f"{path.name}:{chain.name or '_'}", str(path), sequence, ca, mask))
    return found, skipped


def _aligned(polymer: gemmi.ResidueSpan, full: list[str]) -> bool:
    """True when every modelled residue has a place in the deposited sequence."""
    return bool(full) and all(r.label_seq is not None and 1 <= r.label_seq <= len(full) for r in polymer)


def _from_entity(polymer, full: list[str], modified: dict[str, str]) -> tuple[str, np.ndarray, np.ndarray]:
    """The deposited sequence, with the Cα of each modelled residue at its label_seq position."""
    letters = [_one_letter(gemmi.Entity.first_mon(item), modified) for item in full]  # "ALA,GLY": microheterogeneity
    ca = np.zeros((len(full), 3), dtype=np.float32)
    mask = np.zeros(len(full), dtype=bool)
    for residue in polymer:
        index = residue.label_seq - 1
        atom = residue.find_atom("CA", "*")  # by name: some files carry junk in the element column
        if atom is None or mask[index]:  # a second conformer of the same residue: keep the first
            continue
        letters[index] = _one_letter(residue.name, modified)  # the residue seen beats the one deposited
        ca[index], mask[index] = atom.pos.tolist(), True
    return "".join(letters), ca, mask


def _from_model(polymer, modified: dict[str, str]) -> tuple[str, np.ndarray, np.ndarray]:
    """The modelled residues, with unknown ones filling numbered gaps where the Cα trace breaks."""
    letters: list[str] = []
    positions: list[list[float] | None] = []
    last_number, last_ca = None, None
    for residue in polymer:
        atom = residue.find_atom("CA", "*")  # by name: some files carry junk in the element column
        if atom is not None and last_ca is not None and atom.pos.dist(last_ca) > CHAIN_BREAK:
            # The numbering's count, but never fewer than the gap's length needs at 3.8 Å a residue.
            at_least = math.ceil(atom.pos.dist(last_ca) / CA_STEP) - 1
            missing = max(residue.seqid.num - last_number - 1, at_least)
            letters += [UNKNOWN] * missing
            positions += [None] * missing
        letters.append(_one_letter(residue.name, modified))
        positions.append(atom.pos.tolist() if atom is not None else None)
        last_number = residue.seqid.num
        last_ca = atom.pos if atom is not None else last_ca
    mask = np.array([p is not None for p in positions], dtype=bool)
    ca = np.array([p if p is not None else [0.0, 0.0, 0.0] for p in positions], dtype=np.float32).reshape(-1, 3)
    return "".join(letters), ca, mask


def _one_letter(name: str, modified: dict[str, str]) -> str:
    """A residue name's letter: standard ones directly, modified ones as their parent (gemmi's table
    writes MSE as "m", i.e. a modified M; MODRES records name other parents), anything else X."""
    info = gemmi.find_tabulated_residue(name)
    if (info is None or not info.found() or not info.is_amino_acid()) and name in modified:
        info = gemmi.find_tabulated_residue(modified[name])
    if info is None or not info.found() or not info.is_amino_acid():
        return UNKNOWN
    letter = info.one_letter_code.upper()
    letter = RARE_LETTERS.get(letter, letter)
    return letter if letter in AMINO_ACIDS else UNKNOWN


def _nothing_found(structure: gemmi.Structure, skipped: Counter) -> str:
    if len(structure) == 0 or not any(len(chain) for chain in structure[0]):
        return "no atoms: not a PDB or mmCIF structure"
    what = ", ".join(f"{n} {key.removeprefix('skipped_').replace('_', ' ')}" for key, n in sorted(skipped.items()))
    return f"no protein chain with at least {MIN_RESIDUES} residues with a Cα (chains skipped: {what or 'none'})"
