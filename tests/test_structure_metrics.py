"""Structure metrics against hand computations and Biopython: RMSD, lDDT-Cα, GDT_TS, TM-score."""

import math

import numpy as np
import pytest
import torch
from Bio.SVDSuperimposer import SVDSuperimposer

from layerwise.tasks.structure_metrics import (
    gdt_ts,
    lddt_ca,
    lddt_scored,
    per_residue_lddt,
    rmsd,
    superpose,
    tm_score,
)

CA_STEP = 3.8  # Å between consecutive Cα


def _chain(length: int, seed: int = 0) -> torch.Tensor:
    """A random-walk Cα trace (L, 3), float64, consecutive atoms 3.8 Å apart."""
    steps = torch.randn(length, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (steps / steps.norm(dim=-1, keepdim=True) * CA_STEP).cumsum(0)


def _rotation(seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.linalg.det(q) > 0 else -q  # a proper rotation: det +1


def _moved(x: torch.Tensor, seed: int) -> torch.Tensor:
    return x @ _rotation(seed).T + torch.tensor([12.0, -7.0, 30.0], dtype=x.dtype)


def _line(length: int) -> torch.Tensor:
    """Cα on the x axis, 3.8 Å apart: pairs within 15 Å are exactly those 1, 2 or 3 apart (11.4 Å; 15.2 is out)."""
    x = torch.zeros(length, 3, dtype=torch.float64)
    x[:, 0] = torch.arange(length, dtype=torch.float64) * CA_STEP
    return x


def _all(*items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch (pred, true) pairs of equal length with a full mask."""
    pred = torch.stack(items[0::2])
    true = torch.stack(items[1::2])
    return pred, true, torch.ones(pred.shape[:2], dtype=torch.bool)


def test_a_structure_against_itself_and_a_moved_copy_is_perfect():
    true = _chain(60)
    pred, true_b, mask = _all(true, true, _moved(true, 1), true)
    assert torch.allclose(rmsd(pred, true_b, mask), torch.zeros(2, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(superpose(pred, true_b, mask), true_b, atol=1e-9)
    for metric in (lddt_ca, gdt_ts, tm_score):
        assert torch.allclose(metric(pred, true_b, mask), torch.ones(2, dtype=torch.float64), atol=1e-9), metric
    assert torch.equal(per_residue_lddt(pred, true_b, mask), torch.ones(2, 60, dtype=torch.float64))


def test_float32_in_float32_out():
    true = _chain(30).float()
    pred, true_b, mask = _all(_moved(true.double(), 2).float(), true)
    for metric in (rmsd, lddt_ca, gdt_ts, tm_score):
        assert metric(pred, true_b, mask).dtype == torch.float32
    assert rmsd(pred, true_b, mask).item() < 1e-3


def test_a_mirror_image_keeps_every_distance_but_cannot_be_rotated_onto_the_original():
    true = _chain(40, seed=3)
    mirror = true * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    pred, true_b, mask = _all(mirror, true)
    assert lddt_ca(pred, true_b, mask).item() == 1.0
    assert rmsd(pred, true_b, mask).item() > 1.0  # a reflection would make it 0
    # The superposition is a proper rotation: the handedness of every four atoms survives it.
    moved = superpose(pred, true_b, mask)[0]

    def volume(x):
        return torch.det(torch.stack([x[1] - x[0], x[2] - x[0], x[3] - x[0]]))

    assert torch.sign(volume(moved)) == torch.sign(volume(mirror)) == -torch.sign(volume(true))


def test_rmsd_matches_biopython_svd_superimposer():
    rng = np.random.default_rng(0)
    lengths = [5, 17, 50]
    pred = torch.zeros(3, 50, 3, dtype=torch.float64)
    true = torch.zeros(3, 50, 3, dtype=torch.float64)
    mask = torch.zeros(3, 50, dtype=torch.bool)
    expected = []
    for b, n in enumerate(lengths):
        x, y = rng.normal(0, 10, (n, 3)), rng.normal(0, 10, (n, 3))
        pred[b, :n], true[b, :n], mask[b, :n] = torch.from_numpy(x), torch.from_numpy(y), True
        pred[b, n:] = 1e3  # padding far away must not matter
        sup = SVDSuperimposer()
        sup.set(y, x)  # (reference, moving)
        sup.run()
        expected.append(sup.get_rms())
    assert torch.allclose(rmsd(pred, true, mask), torch.tensor(expected, dtype=torch.float64), atol=1e-9)


def test_lddt_of_one_residue_moved_3_angstrom_by_hand():
    # Line of 10 Cα; residue 5 moved 3 Å off the line. Ordered pairs within 15 Å: 2*(9+8+7) = 48.
    # Pairs (5, j) with |5-j| = m: d_true 3.8m, d_pred sqrt((3.8m)^2 + 9), so |Δd| =
    #   m=1: 1.0415 -> below 2 and 4 only: 2/4;  m=2: 0.5707 -> 1, 2, 4: 3/4;  m=3: 0.3881 -> all: 4/4.
    # Each m holds 4 ordered pairs (5 as i or as j, either side); the other 36 pairs are intact.
    true = _line(10)
    pred = true.clone()
    pred[5, 1] += 3.0
    pred, true_b, mask = _all(_moved(pred, 4), true)
    assert lddt_ca(pred, true_b, mask).item() == pytest.approx((36 + 4 * 0.5 + 4 * 0.75 + 4 * 1.0) / 48)
    per = per_residue_lddt(pred, true_b, mask)[0]
    assert per[5].item() == pytest.approx((2 * 0.5 + 2 * 0.75 + 2 * 1.0) / 6)
    assert per[4].item() == pytest.approx((5 + 0.5) / 6)
    assert per[3].item() == pytest.approx((5 + 0.75) / 6)
    assert per[2].item() == pytest.approx(1.0)  # its pair with 5 is 3 apart: all four thresholds kept
    assert per[0].item() == 1.0


def test_lddt_counts_only_masked_residues_and_flags_residues_without_pairs():
    true = _line(10)
    true[9, 0] = 200.0  # isolated: no neighbour within 15 Å
    pred = true.clone()
    pred[5, 1] += 3.0
    pred[7] = torch.tensor([500.0, 500.0, 500.0])  # wildly wrong, but masked out below
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 7] = False
    scored = lddt_scored(true[None], mask)[0]
    assert scored.tolist() == [True] * 7 + [False, True, False]  # 7 masked out, 9 isolated
    per = per_residue_lddt(pred[None], true[None], mask)[0]
    assert per[7].item() == 0.0 and per[9].item() == 0.0
    # Without residue 7: residue 5's pairs are 2, 3, 4, 6, 8 (m = 3, 2, 1, 1, 3).
    assert per[5].item() == pytest.approx((1.0 + 0.75 + 0.5 + 0.5 + 1.0) / 5)


def test_padding_and_masks_give_the_same_scores_as_the_unpadded_chain():
    true = _chain(50, seed=5)
    noise = torch.randn(50, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    pred = _moved(true + noise, 7)
    alone = [m(pred[None], true[None], torch.ones(1, 50, dtype=torch.bool)) for m in (rmsd, lddt_ca, gdt_ts, tm_score)]
    padded_pred = torch.cat([pred, torch.full((30, 3), 77.0, dtype=torch.float64)])[None]
    padded_true = torch.cat([true, torch.randn(30, 3, dtype=torch.float64) * 40])[None]
    mask = torch.arange(80)[None] < 50
    for metric, expected in zip((rmsd, lddt_ca, gdt_ts, tm_score), alone, strict=True):
        assert torch.allclose(metric(padded_pred, padded_true, mask), expected, atol=1e-9), metric


def test_an_empty_mask_scores_zero_and_rmsd_is_nan():
    true = _chain(25)[None]
    mask = torch.zeros(1, 25, dtype=torch.bool)
    assert math.isnan(rmsd(true, true, mask).item())
    for metric in (lddt_ca, gdt_ts, tm_score):
        assert metric(true, true, mask).item() == 0.0


def _displace(true: torch.Tensor, residues: range, distance: float, seed: int) -> torch.Tensor:
    """Each listed residue moved `distance` Å in its own random direction."""
    pred = true.clone()
    direction = torch.randn(len(residues), 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pred[list(residues)] += direction / direction.norm(dim=-1, keepdim=True) * distance
    return pred


def test_gdt_ignores_far_outliers_that_pull_a_least_squares_fit_away():
    # Even residues exact, odd ones moved 20 Å each in a random direction. A rigid motion moves an
    # atom inside the others' span by at most what it moves them, so no superposition can bring an
    # outlier within 8 Å (it would need 12) while keeping the core within 8: GDT_TS is exactly 1/2.
    true = _chain(60, seed=8)
    pred = _displace(true, range(1, 60, 2), 20.0, seed=9)
    p, t, mask = _all(_moved(pred, 10), true)
    assert gdt_ts(p, t, mask).item() == pytest.approx(0.5)
    fitted = (superpose(p, t, mask)[0] - true).norm(dim=-1)
    assert (fitted[0::2] <= 1.0).double().mean() < 0.5  # the one least-squares fit loses the core at 1 Å


def test_gdt_counts_residues_within_each_cutoff():
    # 40 residues, interleaved: 20 exact, 10 moved 3 Å and 10 moved 20 Å. Keeping the exact ones
    # in place counts 20 within 1 Å, 20 within 2 Å, 30 within 4 Å and 30 within 8 Å: 0.625. By the
    # same span argument the 1, 4 and 8 Å counts cannot improve; at 2 Å one superposition may trade
    # a little slack on the exact ones for a 3 Å one, so that count lies between 20 and 30.
    true = _chain(40, seed=11)
    pred = _displace(_displace(true, range(1, 40, 4), 3.0, seed=12), range(3, 40, 4), 20.0, seed=13)
    p, t, mask = _all(_moved(pred, 14), true)
    gdt = gdt_ts(p, t, mask).item()
    assert (0.5 + 0.5 + 0.75 + 0.75) / 4 <= gdt + 1e-9
    assert gdt <= (0.5 + 0.75 + 0.75 + 0.75) / 4 + 1e-9


def _hinge(length: int, angle_degrees: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A chain whose second half is turned about its middle atom: two rigid domains."""
    true = _chain(length, seed=12)
    half = length // 2
    turn = torch.tensor(math.radians(angle_degrees), dtype=torch.float64)
    c, s = torch.cos(turn), torch.sin(turn)
    rot = torch.stack([torch.stack([c, -s, c * 0]), torch.stack([s, c, c * 0]), torch.tensor([0.0, 0.0, 1.0])])
    pred = true.clone()
    pred[half:] = (true[half:] - true[half]) @ rot.T + true[half]
    return pred, true


def test_gdt_and_tm_search_beat_the_single_least_squares_fit_on_a_hinge():
    pred, true = _hinge(80, 40.0)
    p, t, mask = _all(_moved(pred, 13), true)
    global_fit = (superpose(p, t, mask)[0] - true).norm(dim=-1)
    global_gdt = np.mean([(global_fit <= c).double().mean().item() for c in (1, 2, 4, 8)])
    gdt = gdt_ts(p, t, mask).item()
    assert gdt >= 0.5  # superposing either domain alone puts half the residues at 0 Å
    assert gdt > global_gdt + 0.1
    d0 = 1.24 * (80 - 15) ** (1 / 3) - 1.8
    half_tm = 0.5 + (1 / (1 + ((pred[40:] - true[40:]).norm(dim=-1) / d0) ** 2)).sum().item() / 80
    global_tm = (1 / (1 + (global_fit / d0) ** 2)).mean().item()
    assert tm_score(p, t, mask).item() >= max(half_tm, global_tm) - 1e-9


def test_tm_score_uses_d0_of_the_target_length():
    # L = 60: d0 = 1.24 * 45^(1/3) - 1.8 = 2.6106 Å. 40 residues exact, 20 moved 30 Å in random
    # directions: the core fit gives 40/60 + Σ 1/(1 + (30/d0)^2)/60; no other fit can do much better.
    true = _chain(60, seed=14)
    pred = _displace(true, range(20, 40), 30.0, seed=15)
    d0 = 1.24 * 45 ** (1 / 3) - 1.8
    assert d0 == pytest.approx(2.6106, abs=1e-4)
    expected = (40 + 20 / (1 + (30 / d0) ** 2)) / 60
    p, t, mask = _all(_moved(pred, 16), true)
    assert tm_score(p, t, mask).item() == pytest.approx(expected, abs=2e-3)


def test_short_chains_use_the_smallest_d0():
    # L <= 21 gives 1.24·∛(L−15) − 1.8 < 0.5 (or no real root), so d0 = 0.5 Å: one residue 1 Å
    # off the others (which fit exactly) contributes 1/(1 + 4) instead of ~1.
    true = _chain(12, seed=17)
    pred = true.clone()
    pred[11] += torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    p, t, mask = _all(pred, true)
    assert tm_score(p, t, mask).item() == pytest.approx((11 + 1 / 5) / 12, abs=1e-3)


def test_metrics_accept_tensors_that_require_grad():
    true = _chain(30)
    pred = (true + 0.5).requires_grad_(True)
    p, t, mask = torch.stack([pred]), true[None], torch.ones(1, 30, dtype=torch.bool)
    for metric in (lddt_ca, gdt_ts, tm_score):
        assert metric(p, t, mask).item() == pytest.approx(1.0)
    rmsd(p, t, mask).sum().backward()  # the superposition itself stays differentiable
    assert pred.grad is not None
