"""Structure baselines: the ideal helix and the nearest-template copy."""

from pathlib import Path

import numpy as np
import pytest
import torch

from layerwise.data.structures import AMINO_ACIDS, ProteinChain, read_structures
from layerwise.tasks.fold_baselines import CA_STEP, TemplateBaseline, ideal_helix
from layerwise.tasks.structure_metrics import lddt_ca

NMR_WITH_DNA = Path("/usr/share/doc/theseus/examples/1s40.pdb.gz")  # residues 1-4 of chain A unmodelled


def _chain(name: str, sequence: str, seed: int, mask: np.ndarray | None = None) -> ProteinChain:
    rng = np.random.default_rng(seed)
    steps = rng.normal(size=(len(sequence), 3))
    ca = np.cumsum(steps / np.linalg.norm(steps, axis=1, keepdims=True) * CA_STEP, axis=0).astype(np.float32)
    mask = np.ones(len(sequence), dtype=bool) if mask is None else mask
    return ProteinChain(name, name, sequence, np.where(mask[:, None], ca, 0).astype(np.float32), mask)


def _random_sequence(seed: int, length: int) -> str:
    return "".join(np.random.default_rng(seed).choice(list(AMINO_ACIDS), length))


def _lddt(pred: np.ndarray, chain: ProteinChain) -> float:
    as_tensor = [torch.from_numpy(np.asarray(x))[None] for x in (pred, chain.ca, chain.mask)]
    return lddt_ca(*as_tensor).item()


def test_ideal_helix_has_alpha_helix_geometry():
    helix = ideal_helix(12)
    assert helix.shape == (12, 3) and helix.dtype == np.float32
    gaps = {k: np.linalg.norm(helix[k:] - helix[:-k], axis=1) for k in (1, 3, 4)}
    # Hand values: sqrt(2·2.3²·(1 - cos 100°) + 1.5²) = 3.83; i+3: sqrt(2.3² + 4.5²) = 5.05;
    # i+4: sqrt((2·2.3·sin 20°)² + 6²) = 6.20 Å, as in real α-helices.
    np.testing.assert_allclose(gaps[1], 3.83, atol=0.01)
    np.testing.assert_allclose(gaps[3], 5.05, atol=0.01)
    np.testing.assert_allclose(gaps[4], 6.20, atol=0.01)
    assert ideal_helix(0).shape == (0, 3)


def test_a_training_sequence_gets_its_own_coordinates():
    chains = [_chain(f"c{i}", _random_sequence(i, 60 + 10 * i), seed=i) for i in range(5)]
    baseline = TemplateBaseline(chains)
    for chain in chains:
        template, value = baseline.best_template(chain.sequence)
        assert template is chain and value == 1.0
        pred = baseline.predict(chain.sequence)
        np.testing.assert_array_equal(pred, chain.ca)
        assert _lddt(pred, chain) == 1.0


def test_a_mutant_picks_its_relative_as_template():
    chains = [_chain(f"c{i}", _random_sequence(i, 80), seed=i) for i in range(6)]
    rng = np.random.default_rng(9)
    query = "".join(c if rng.random() < 0.7 else rng.choice(list(AMINO_ACIDS)) for c in chains[3].sequence)
    template, value = TemplateBaseline(chains).best_template(query)
    assert template is chains[3] and 0.6 < value < 0.9


def test_unmatched_positions_are_interpolated_and_ends_extended():
    sequence = _random_sequence(1, 40)
    mask = np.ones(40, dtype=bool)
    mask[20] = False  # a residue without a Cα inside the template
    template = _chain("t", sequence, seed=1, mask=mask)
    query = "MKW" + sequence + "GS"  # three residues before the template starts, two after it ends
    pred = TemplateBaseline([template]).predict(query)
    assert pred.shape == (45, 3)
    np.testing.assert_array_equal(pred[3:23], template.ca[:20])
    np.testing.assert_allclose(pred[23], (template.ca[19] + template.ca[21]) / 2, atol=1e-5)  # midway
    direction = (template.ca[0] - template.ca[1]) / np.linalg.norm(template.ca[0] - template.ca[1])
    for k in (1, 2, 3):  # continuing the chain's first step backwards, 3.8 Å at a time
        np.testing.assert_allclose(pred[3 - k], template.ca[0] + k * CA_STEP * direction, atol=1e-4)
    direction = (template.ca[39] - template.ca[38]) / np.linalg.norm(template.ca[39] - template.ca[38])
    np.testing.assert_allclose(pred[44], template.ca[39] + 2 * CA_STEP * direction, atol=1e-4)


def test_no_template_gives_an_ideal_helix():
    chains = [_chain("c", "W" * 30, seed=0)]
    np.testing.assert_array_equal(TemplateBaseline(chains).predict("P" * 25), ideal_helix(25))
    np.testing.assert_array_equal(TemplateBaseline([]).predict("MKVLA" * 5), ideal_helix(25))


@pytest.mark.skipif(not NMR_WITH_DNA.is_file(), reason="theseus-examples is not installed")
def test_a_real_chain_with_unmodelled_residues_is_reproduced_where_observed():
    (chain,), _, _ = read_structures(NMR_WITH_DNA)
    pred = TemplateBaseline([chain]).predict(chain.sequence)
    np.testing.assert_array_equal(pred[chain.mask], chain.ca[chain.mask])
    assert _lddt(pred, chain) == 1.0
    steps = np.linalg.norm(np.diff(pred[:5], axis=0), axis=1)
    np.testing.assert_allclose(steps, CA_STEP, atol=1e-4)  # residues 1-4 extend the chain's start
