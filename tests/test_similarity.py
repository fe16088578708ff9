"""Sequence identity and the leakage-free train/validation split of protein chains."""

from pathlib import Path

import numpy as np
import pytest

from layerwise.data.similarity import identity, similar_pairs, split_by_similarity
from layerwise.data.structures import AMINO_ACIDS, read_structures
from layerwise.errors import InputError

EXAMPLES = Path("/usr/share/doc/theseus/examples")  # Debian package theseus-examples (scripts/setup.sh)
MAX_IDENTITY = 0.3


def _random(rng: np.random.Generator, length: int) -> str:
    return "".join(rng.choice(list(AMINO_ACIDS), length))


def _mutant(rng: np.random.Generator, sequence: str, keep: float) -> str:
    """Each residue kept with probability `keep`, otherwise replaced by a random one."""
    return "".join(c if rng.random() < keep else rng.choice(list(AMINO_ACIDS)) for c in sequence)


def test_identity_is_relative_to_the_shorter_sequence_and_ignores_x():
    assert identity("MKVLA", "MKVLA") == 1.0
    assert identity("MKVLG", "MKVLA") == pytest.approx(4 / 5)
    assert identity("MKVLAWHEC", "GGGMKVLAWHECGGGGGG") == 1.0  # a fragment is identical to its protein
    assert identity("MKXXAWHEC", "MKXXAWHEC") == pytest.approx(7 / 9)  # unknown residues never match
    assert identity("", "MKV") == 0.0 and identity("W", "P") == 0.0
    rng = np.random.default_rng(0)
    a, b = _random(rng, 120), _random(rng, 90)
    assert identity(a, b) == identity(b, a) < 0.2  # unrelated sequences


def _chains_and_families() -> tuple[list[str], list[str]]:
    """Real chains from three families plus seeded random families (a parent and 3 mutants at 60%)."""
    sequences, families = [], []
    for folder, count in (("cytochromes", 10), ("trypsins", 20), ("ldh", 20)):
        files = sorted((EXAMPLES / folder).glob("*.pdb.gz"))[:count]
        chains, _, _ = read_structures(files)
        sequences += [c.sequence for c in chains]
        families += [folder] * len(chains)
    rng = np.random.default_rng(1)
    for family in range(8):
        parent = _random(rng, int(rng.integers(60, 200)))
        members = [parent] + [_mutant(rng, parent, 0.6) for _ in range(3)] if family < 4 else [parent]
        sequences += members
        families += [f"random{family}"] * len(members)
    return sequences, families


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="theseus-examples is not installed")
def test_no_validation_chain_is_similar_to_a_training_chain_and_families_stay_together():
    sequences, families = _chains_and_families()
    train, val, info = split_by_similarity(sequences, val_fraction=0.25, seed=0, max_identity=MAX_IDENTITY)
    assert sorted(train + val) == list(range(len(sequences))) and not set(train) & set(val)
    assert info["n_train"] == len(train) and info["n_val"] == len(val) > 0
    assert abs(len(val) - 0.25 * len(sequences)) <= 0.1 * len(sequences)
    # Every training-validation pair, aligned exhaustively: none above the threshold.
    worst = max(identity(sequences[i], sequences[j]) for i in val for j in train)
    assert worst <= MAX_IDENTITY
    assert info["max_cross_identity"] <= worst
    sides = {}
    for index, family in enumerate(families):
        sides.setdefault(family, set()).add(index in set(val))
    for family in ("trypsins", "random0", "random1", "random2", "random3"):
        assert len(sides[family]) == 1, family  # a family is on one side only


def test_the_split_is_seeded():
    rng = np.random.default_rng(2)
    sequences = []
    for _ in range(30):
        parent = _random(rng, int(rng.integers(50, 150)))
        sequences += [parent, _mutant(rng, parent, 0.8)]
    first = split_by_similarity(sequences, 0.2, seed=7)
    assert split_by_similarity(sequences, 0.2, seed=7) == first
    assert first[2]["n_clusters"] == 30
    others = [split_by_similarity(sequences, 0.2, seed=s)[1] for s in (8, 9)]
    assert any(val != first[1] for val in others)
    for i in first[1]:
        assert (i ^ 1) in first[1]  # each sequence's mutant is with it


def test_similar_pairs_finds_relatives_across_two_sets():
    rng = np.random.default_rng(4)
    parents = [_random(rng, int(rng.integers(80, 200))) for _ in range(6)]
    queries = [_mutant(rng, parents[1], 0.6), _mutant(rng, parents[4], 0.5), _random(rng, 120)]
    targets = parents + [_random(rng, 150) for _ in range(20)]
    assert sorted(similar_pairs(queries, targets)) == [(0, 1), (1, 4)]
    assert similar_pairs([], targets) == similar_pairs(queries, []) == []


def test_bad_requests_are_input_errors():
    rng = np.random.default_rng(3)
    parent = _random(rng, 100)
    with pytest.raises(InputError, match="val_fraction"):
        split_by_similarity([parent, _random(rng, 100)], val_fraction=1.0, seed=0)
    with pytest.raises(InputError, match="one family"):
        split_by_similarity([parent, _mutant(rng, parent, 0.9), _mutant(rng, parent, 0.9)], 0.3, seed=0)
