"""The fold demo's data: real protein structures that ship offline as Debian packages.

Training chains come from ProMod3's structure database (`promod3-data`: 21,119 chains with backbone
coordinates in ProMod3's binary format, read by data/promod3.py). They are written once as Cα-only
PDB files, so the demo trains through the same `read_structures` path a user's PDB folder takes.
Held-out test chains are the protein families of `theseus-examples` (cytochromes c, lactate
dehydrogenases, trypsins: real PDB files); every database chain within 30% identity of any of them is
left out of training, so the test measures folding of families the network has never seen.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import numpy as np

from layerwise.data.datasets import DatasetUnavailable

THESEUS_EXAMPLES = Path("/usr/share/doc/theseus/examples")
THESEUS_FAMILIES = ("cytochromes", "ldh", "trypsins")
TRAIN_CHAINS = 3000
LENGTHS = (40, 320)  # residues: longer chains cost L^2 memory for little extra to learn from in minutes
MAX_IDENTITY = 0.3
CANDIDATES = 4000  # database chains drawn before the identity filter (a few hundred are LDH/trypsin relatives)


def prepare_fold_demo(cache: Path, seed: int = 0) -> tuple[Path, Path]:
    """(train folder of Cα PDB files, test folder of theseus families), built once under `cache`."""
    root = cache / "fold-demo"
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        return train_dir, test_dir
    shutil.rmtree(train_dir, ignore_errors=True)  # half of an interrupted rename
    shutil.rmtree(test_dir, ignore_errors=True)
    from layerwise.data.promod3 import STRUCTURE_DB, read_structure_db
    from layerwise.data.similarity import identity, similar_pairs
    from layerwise.data.structures import read_structures, write_ca_pdb

    missing = [p for p in (STRUCTURE_DB, THESEUS_EXAMPLES) if not p.exists()]
    if missing:
        raise DatasetUnavailable(
            f"the fold demo needs Debian's promod3-data and theseus-examples ({', '.join(map(str, missing))} "
            "missing): run scripts/setup.sh"
        )
    root.mkdir(parents=True, exist_ok=True)
    # Built in a staging folder and renamed at the end: an interrupted preparation leaves nothing half-made.
    stage = Path(tempfile.mkdtemp(prefix=".fold-demo-", dir=root))
    for family in THESEUS_FAMILIES:
        shutil.copytree(
            THESEUS_EXAMPLES / family,
            stage / "test" / family,
            ignore=shutil.ignore_patterns("*.aln", "*.filemap", "README"),
        )
    test_chains, _, _ = read_structures(stage / "test")
    low, high = LENGTHS
    pool = [entry for entry in read_structure_db() if low <= len(entry[1]) <= high]
    drawn = random.Random(seed).sample(pool, min(CANDIDATES, len(pool)))
    queries = [c.sequence for c in test_chains]
    related = {
        j for i, j in similar_pairs(queries, [seq for _, seq, _ in drawn])
        if identity(queries[i], drawn[j][1]) > MAX_IDENTITY
    }  # fmt: skip
    kept = [entry for j, entry in enumerate(drawn) if j not in related][:TRAIN_CHAINS]
    (stage / "train").mkdir()
    for name, sequence, ca in kept:
        write_ca_pdb(stage / "train" / f"{name}.pdb", sequence, ca, np.zeros(len(sequence)))
    (stage / "README").write_text(
        f"{len(kept)} training chains from {STRUCTURE_DB} ({len(related)} of {len(drawn)} drawn were within "
        f"{MAX_IDENTITY:.0%} identity of a test chain and left out); test: {', '.join(THESEUS_FAMILIES)} from "
        f"{THESEUS_EXAMPLES}\n"
    )
    (stage / "train").rename(train_dir)
    (stage / "test").rename(test_dir)
    (stage / "README").rename(root / "README")
    shutil.rmtree(stage, ignore_errors=True)
    return train_dir, test_dir
