"""Protein chains from ProMod3's StructureDB, read from Debian's ``promod3-data`` without ProMod3.

``structure_db.dat`` is the *raw* format of ``StructureDB::Save`` (ProMod3 3.2,
``modules/loop/src/structure_db.cc``), little-endian, as found by reading ``Save`` and
``SavePortable`` in Debian's ``libpromod3_loop.so.3.2.1`` and the ``libpromod3-*-dev`` headers
(``structure_db.hh``, ``structure_db_custom_types.hh``, ``ushort_vec.hh``, ``core/check_io.hh``):

    offset  type            content
    0       uint32          magic number 1234
    4       uint32          version 2
    8       11 x uint32     sizeof() checks: 4 4 2 8 2 6 88 40 24 6 4 (88 = sizeof(CoordInfo) on x86-64)
    52      uint32 float32 char uint16 uint64 int16   the value 1 in each type (byte-order check)
    73      int32           stored_data bit field (-1: every optional array below is present)
    77      uint64          number of chains, then per chain a CoordInfo:
                              uint32 n + n chars PDB id, uint32 n + n chars chain name,
                              uint32 offset, uint16 size, uint16 start_resnum, 3 x float32 shift
    ...     uint64 N + N chars                      one-letter sequences of all chains, concatenated
    ...     uint64 N + N x 12 uint16                N, CA, C, O of every residue, in 0.01 A units;
                                                    position = units * 0.01 - shift of its chain
    ...     uint64 N + N x item, for each bit set in stored_data, in bit order: dihedrals (4 bytes),
            solvent accessibility (2), residue depth (2), DSSP state (1), sequence profile (40),
            structure profile (40)

``SavePortable`` writes a different check block and stores each array page by page, so a portable
file is refused here rather than misread. The whole file is memory-mapped; only the chain table
is parsed up front (about 0.1 s for 21,119 chains).
"""

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from layerwise.errors import InputError

STRUCTURE_DB = Path("/usr/share/promod3/loop_data/structure_db.dat")
MAGIC = 1234
VERSION = 2
COORD_UNIT = np.float32(0.01)  # Angstrom per stored uint16 step (promod3::UShortVec)

_HEADER = struct.Struct("<II")
_CHECKS = struct.Struct("<11IIfBHQh")
# What StructureDB::Save writes on little-endian x86-64 Linux (check_io.hh WriteTypeSize/WriteBaseType).
_RAW_CHECKS = (4, 4, 2, 8, 2, 6, 88, 40, 24, 6, 4, 1, 1.0, 1, 1, 1, 1)
_STORED_AND_COUNT = struct.Struct("<iQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_COORD_TAIL = struct.Struct("<IHHfff")  # offset, size, start_resnum, shift x y z
_RESIDUE_BYTES = 24  # PeptideCoords: N, CA, C, O as 3 x uint16 each
_CA = 1  # index of CA among N, CA, C, O
# Byte size of each optional per-residue array, keyed by its StructureDB::DBDataType bit, in file order.
_OPTIONAL_ITEM_BYTES = {1: 4, 2: 2, 4: 2, 8: 1, 16: 40, 32: 40}
_PORTABLE_HINT = (
    "expected the raw little-endian layout of ProMod3's StructureDB::Save "
    "(a file from SavePortable must be converted with ProMod3 first: StructureDB.LoadPortable(f).Save(g))"
)


class _Chain(NamedTuple):
    name: str  # lower-case PDB id + chain name, e.g. "12asA"
    offset: int  # first residue in the concatenated arrays
    size: int  # number of residues
    shift: np.ndarray  # (3,) float32, subtracted from the decoded positions


class _Index(NamedTuple):
    chains: list[_Chain]
    sequences_at: int  # byte offset of the first sequence letter
    coords_at: int  # byte offset of the first residue's PeptideCoords


def read_structure_db(path: Path = STRUCTURE_DB, limit: int | None = None) -> Iterator[tuple[str, str, np.ndarray]]:
    """Chains of a ProMod3 StructureDB, in file order: (name, sequence, CA positions).

    `name` is the lower-case PDB id followed by the chain name ("12asA"); `sequence` holds one
    letter per residue; the CA positions are float32 of shape (L, 3) in Angstrom, in the frame of
    the PDB entry. `limit` stops after that many chains. The header and chain table are checked
    here, before the first chain is yielded: a wrong magic number, version or layout, or a
    truncated file, raises InputError naming the file.
    """
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}")
    if not path.is_file():
        raise InputError(f"{path}: no such file (Debian's promod3-data package installs it)")
    if path.stat().st_size < _HEADER.size + _CHECKS.size + _STORED_AND_COUNT.size:
        raise InputError(f"{path}: truncated: too short for a StructureDB header")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    index = _read_index(data, path)
    return _chains(data, index, limit)


def _chains(data: np.ndarray, index: _Index, limit: int | None) -> Iterator[tuple[str, str, np.ndarray]]:
    for chain in index.chains[:limit]:
        start = index.sequences_at + chain.offset
        sequence = data[start : start + chain.size].tobytes().decode("ascii")
        start = index.coords_at + chain.offset * _RESIDUE_BYTES
        units = data[start : start + chain.size * _RESIDUE_BYTES].view("<u2").reshape(chain.size, 4, 3)
        yield chain.name, sequence, units[:, _CA].astype(np.float32) * COORD_UNIT - chain.shift


def _read_index(data: np.ndarray, path: Path) -> _Index:
    """Check the header, parse the chain table and check that every array is there, whole."""
    buffer = memoryview(data)
    magic, version = _HEADER.unpack_from(buffer, 0)
    if magic != MAGIC:
        raise InputError(f"{path}: not a ProMod3 binary file (magic number {magic}, expected {MAGIC})")
    if version != VERSION:
        raise InputError(f"{path}: StructureDB version {version}, this reader knows version {VERSION}")
    if _CHECKS.unpack_from(buffer, _HEADER.size) != _RAW_CHECKS:
        raise InputError(f"{path}: unexpected type-size/byte-order check block; {_PORTABLE_HINT}")
    stored_data, n_chains = _STORED_AND_COUNT.unpack_from(buffer, _HEADER.size + _CHECKS.size)
    position = _HEADER.size + _CHECKS.size + _STORED_AND_COUNT.size
    try:
        chains = []
        for _ in range(n_chains):
            pdb_id, position = _read_string(buffer, position)
            chain_name, position = _read_string(buffer, position)
            offset, size, _start_resnum, *shift = _COORD_TAIL.unpack_from(buffer, position)
            position += _COORD_TAIL.size
            chains.append(_Chain(pdb_id.lower() + chain_name, offset, size, np.array(shift, dtype=np.float32)))
        n_residues, sequences_at = _read_count(buffer, position)
        coords_count, coords_at = _read_count(buffer, sequences_at + n_residues)
        counts, end = [coords_count], coords_at + coords_count * _RESIDUE_BYTES
        for bit, item_bytes in _OPTIONAL_ITEM_BYTES.items():
            if stored_data & bit:
                count, at = _read_count(buffer, end)
                counts.append(count)
                end = at + count * item_bytes
    except (struct.error, UnicodeDecodeError) as err:
        raise InputError(f"{path}: truncated or corrupt after byte {position} ({err})") from err
    if end != len(data):
        state = "truncated" if end > len(data) else "has trailing bytes"
        raise InputError(f"{path}: {state}: the header describes {end} bytes, the file holds {len(data)}")
    if any(count != n_residues for count in counts):
        raise InputError(f"{path}: per-residue arrays disagree in length ({n_residues} residues vs {counts})")
    for chain in chains:
        if chain.offset + chain.size > n_residues:
            raise InputError(f"{path}: chain {chain.name} runs past the {n_residues} stored residues")
    return _Index(chains, sequences_at, coords_at)


def _read_string(buffer: memoryview, position: int) -> tuple[str, int]:
    """A uint32-length-prefixed ASCII string at `position`, and the position after it."""
    (length,) = _U32.unpack_from(buffer, position)
    start = position + _U32.size
    if start + length > len(buffer):
        raise struct.error(f"string of {length} bytes past the end of the file")
    return bytes(buffer[start : start + length]).decode("ascii"), start + length


def _read_count(buffer: memoryview, position: int) -> tuple[int, int]:
    """A uint64 element count at `position`, and the position of the first element."""
    (count,) = _U64.unpack_from(buffer, position)
    return count, position + _U64.size
