"""How close a predicted Cα trace is to the true one: RMSD, lDDT, GDT_TS and TM-score.

All functions take batched, padded tensors: `pred` and `true` (B, L, 3) in Å, and `mask` (B, L) bool,
True where residue i exists in the true structure (and so is scored). Arithmetic is float64
internally; results come back in `pred`'s dtype. Nothing here imports training code, so a model, a
report or a test can use it alone.

lDDT compares distances only and needs no superposition. RMSD uses the one least-squares
superposition. GDT_TS and TM-score are defined as maxima over all superpositions; they are
approximated by a seeded search (see `gdt_ts`), so they are lower bounds of the exact values,
usually equal to them or within a few hundredths.

An item whose mask is empty scores 0 (lDDT, GDT_TS, TM-score) and has RMSD NaN: there is nothing to
compare, and 0 RMSD would read as perfect.
"""

from __future__ import annotations

import torch
from torch import Tensor

LDDT_CUTOFF = 15.0  # Å: inclusion radius on the TRUE distances (Mariani et al. 2013)
LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)  # Å: a pair is preserved if |d_pred - d_true| < threshold
GDT_CUTOFFS = (1.0, 2.0, 4.0, 8.0)  # Å: GDT_TS is the mean fraction of residues within each
SEED_LENGTHS = (4, 8, 16, 32)  # residues per seed window; windows overlap by half, plus the whole chain
SEARCH_ITERATIONS = 8  # at most; a seed stops once its selected set stops changing (usually 2-4)
MIN_SELECTED = 3  # a superposition needs three points; fewer selected -> use the 3 closest instead
TM_SEARCH_MIN, TM_SEARCH_MAX = 4.5, 8.0  # Å: the TM-score program's clamp on its selection radius


def superpose(pred: Tensor, true: Tensor, mask: Tensor) -> Tensor:
    """`pred` (B, L, 3) moved by the proper rotation and translation that best fit it onto `true`
    over the masked residues (Kabsch, least squares). Every residue is moved, masked or not."""
    p, t = pred.double(), true.double()
    rotation, p_centre, t_centre = _kabsch(p, t, mask.double())
    return _apply(p, rotation, p_centre, t_centre).to(pred.dtype)


def rmsd(pred: Tensor, true: Tensor, mask: Tensor) -> Tensor:
    """Root-mean-square deviation (Å) over the masked residues after `superpose`: (B,)."""
    moved = superpose(pred, true, mask).double()
    weights = mask.double()
    squared = ((moved - true.double()) ** 2).sum(-1)  # (B, L)
    mean = (squared * weights).sum(-1) / weights.sum(-1)  # 0/0 -> NaN for an empty mask
    return mean.sqrt().to(pred.dtype)


@torch.no_grad()
def lddt_pairs(true: Tensor, mask: Tensor, cutoff: float = LDDT_CUTOFF) -> Tensor:
    """(B, L, L) bool: the pairs lDDT scores — both residues masked in, i != j, true distance < cutoff."""
    t = true.double()
    within = torch.cdist(t, t) < cutoff
    both = mask[:, :, None] & mask[:, None, :]
    not_self = ~torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
    return within & both & not_self


@torch.no_grad()
def lddt_scored(true: Tensor, mask: Tensor, cutoff: float = LDDT_CUTOFF) -> Tensor:
    """(B, L) bool: residues that have at least one scored pair; the others get per-residue lDDT 0
    and callers averaging `per_residue_lddt` (or training on it) should leave them out."""
    return lddt_pairs(true, mask, cutoff).any(-1)


@torch.no_grad()
def per_residue_lddt(pred: Tensor, true: Tensor, mask: Tensor, cutoff: float = LDDT_CUTOFF) -> Tensor:
    """lDDT-Cα of each residue in [0, 1]: (B, L).

    For residue i, over its pairs (i, j) from `lddt_pairs`, the fraction of the four thresholds
    (0.5, 1, 2, 4 Å) within which |d_pred(i, j) - d_true(i, j)| falls, averaged over the pairs.
    Residues with no pair (masked out, or isolated beyond the cutoff) are 0; `lddt_scored` says which.
    Distances only, so it does not depend on either structure's frame.
    """
    preserved, pairs = _lddt_terms(pred, true, mask, cutoff)
    per_residue = preserved.sum(-1) / pairs.sum(-1).clamp(min=1)
    return per_residue.to(pred.dtype)


@torch.no_grad()
def lddt_ca(pred: Tensor, true: Tensor, mask: Tensor, cutoff: float = LDDT_CUTOFF) -> Tensor:
    """Global lDDT-Cα in [0, 1]: (B,). Pair-averaged, as the standard score is: the preserved
    fraction summed over every scored pair and threshold, divided by the number of scored pairs
    (so a residue with many neighbours weighs more than one with few)."""
    preserved, pairs = _lddt_terms(pred, true, mask, cutoff)
    score = preserved.sum((-1, -2)) / pairs.sum((-1, -2)).clamp(min=1)
    return score.to(pred.dtype)


@torch.no_grad()
def gdt_ts(pred: Tensor, true: Tensor, mask: Tensor) -> Tensor:
    """GDT_TS in [0, 1]: (B,). The mean over cutoffs 1, 2, 4 and 8 Å of the largest fraction of
    masked residues that one superposition brings within the cutoff (the fraction's denominator is
    the number of masked residues).

    The maximum over all superpositions is approximated as LGA does: seed windows of 4, 8, 16 and
    32 consecutive residues (half-overlapping) and the whole chain; superpose on the seed, then
    re-superpose up to SEARCH_ITERATIONS times on the residues within the cutoff (or the 3 closest if
    fewer); every cutoff's fraction is read at every superposition found and the best kept.
    """
    return _per_item(pred, true, mask, lambda p, t: _best_over_search(p, t, _gdt_fractions, GDT_CUTOFFS).mean())


@torch.no_grad()
def tm_score(pred: Tensor, true: Tensor, mask: Tensor) -> Tensor:
    """TM-score in (0, 1]: (B,). (1/L) Σ 1 / (1 + (d_i/d0)²) over the masked residues, with L their
    number and d0 = 1.24·∛(L − 15) − 1.8 Å (at least 0.5 Å), maximised over superpositions.

    The maximum is searched as the TM-score program does, approximately: the same seeds as
    `gdt_ts`, each re-superposed on the residues within d0 clamped to [4.5, 8] Å.
    """
    return _per_item(pred, true, mask, _tm_score_one)


def _tm_score_one(pred: Tensor, true: Tensor) -> Tensor:
    d0 = _tm_d0(len(pred))
    radius = min(max(d0, TM_SEARCH_MIN), TM_SEARCH_MAX)
    return _best_over_search(pred, true, lambda d: _tm_terms(d, d0), (radius,))[0]


def _tm_d0(length: int) -> float:
    d0 = 1.24 * (length - 15) ** (1 / 3) - 1.8 if length > 15 else 0.0
    return max(d0, 0.5)


def _tm_terms(distances: Tensor, d0: float) -> Tensor:
    """(S, n) distances -> (S, 1) TM-scores."""
    return (1 / (1 + (distances / d0) ** 2)).mean(-1, keepdim=True)


def _gdt_fractions(distances: Tensor) -> Tensor:
    """(S, n) distances -> (S, 4) fraction of residues within each GDT cutoff."""
    cutoffs = distances.new_tensor(GDT_CUTOFFS)
    return (distances[:, :, None] <= cutoffs).sum(1).to(distances.dtype) / distances.shape[1]


def _lddt_terms(pred: Tensor, true: Tensor, mask: Tensor, cutoff: float) -> tuple[Tensor, Tensor]:
    """(B, L, L) preserved fraction per pair (0 off the scored pairs), and the scored-pair mask as float."""
    pairs = lddt_pairs(true, mask, cutoff).double()
    p, t = pred.double(), true.double()
    error = (torch.cdist(p, p) - torch.cdist(t, t)).abs()
    thresholds = error.new_tensor(LDDT_THRESHOLDS)
    preserved = (error[..., None] < thresholds).double().mean(-1)  # (B, L, L)
    return preserved * pairs, pairs


def _kabsch(pred: Tensor, true: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The weighted least-squares rotation (..., 3, 3) and the two centroids (..., 1, 3) taking
    `pred` (..., L, 3) onto `true` (..., L, 3); weights (..., L) >= 0. Broadcasts, so one chain
    (L, 3) against many weightings (S, L) costs two matrix products, not S copies of the chain."""
    total = weights.sum(-1)[..., None, None].clamp(min=1e-12)  # (..., 1, 1)
    p_centre = _weighted_sum(weights, pred)[..., None, :] / total
    t_centre = _weighted_sum(weights, true)[..., None, :] / total
    outer = (pred[..., :, None] * true[..., None, :]).flatten(-2)  # (..., L, 9): p_i t_jᵀ per residue
    # Σ w (p - p̄)(t - t̄)ᵀ = Σ w p tᵀ - W p̄ t̄ᵀ
    covariance = _weighted_sum(weights, outer).unflatten(-1, (3, 3)) - total * p_centre.mT @ t_centre
    u, _, vh = torch.linalg.svd(covariance)
    # A reflection can fit better than any rotation (a mirror image); flip the weakest axis instead.
    sign = torch.where(_det3(vh) * _det3(u) < 0, -1.0, 1.0).to(pred.dtype)  # det(V Uᵀ)
    flip = torch.ones(*sign.shape, 3, dtype=pred.dtype, device=pred.device)
    flip[..., 2] = sign
    rotation = (vh.mT * flip[..., None, :]) @ u.mT
    return rotation, p_centre, t_centre


def _det3(m: Tensor) -> Tensor:
    """Determinants of (..., 3, 3) matrices; the closed form is far quicker than a batched LU."""
    return (torch.linalg.cross(m[..., 0, :], m[..., 1, :]) * m[..., 2, :]).sum(-1)


def _weighted_sum(weights: Tensor, values: Tensor) -> Tensor:
    """Σ_i weights[..., i] values[..., i, :]: (..., L) x (..., L, K) -> (..., K). One plain matrix
    product when `values` is a single chain, as a broadcast batched one would copy it S times."""
    if values.dim() == 2:
        return weights @ values
    return (weights[..., None, :] @ values).squeeze(-2)


def _apply(pred: Tensor, rotation: Tensor, p_centre: Tensor, t_centre: Tensor) -> Tensor:
    # Row vectors: x -> R (x - p̄) + t̄. einsum makes one chain against S rotations a single product.
    return torch.einsum("...ni,...ji->...nj", pred, rotation) + (t_centre - p_centre @ rotation.mT)


def _per_item(pred: Tensor, true: Tensor, mask: Tensor, score_one) -> Tensor:
    """(B,) scores from `score_one(pred (n, 3), true (n, 3)) -> ()` run on each item's masked
    residues only (float64); an item with none scores 0."""
    scores = []
    for p, t, m in zip(pred.double(), true.double(), mask.bool(), strict=True):
        scores.append(score_one(p[m], t[m]) if m.any() else p.new_zeros(()))
    return torch.stack(scores).to(pred.dtype)


def _seeds(n: int, device: torch.device) -> Tensor:
    """(S, n) float64 0/1 weights: half-overlapping windows of each SEED_LENGTHS shorter than the
    chain, and the whole chain."""
    index = torch.arange(n, device=device)
    rows = [torch.ones(1, n, dtype=torch.float64, device=device)]
    for length in SEED_LENGTHS:
        if length >= n:
            break
        starts = list(range(0, n - length + 1, length // 2))
        if starts[-1] != n - length:
            starts.append(n - length)  # the chain's last residues are a seed too
        start = torch.tensor(starts, device=device)[:, None]
        rows.append(((index >= start) & (index < start + length)).double())
    return torch.cat(rows)


def _best_over_search(pred: Tensor, true: Tensor, score, radii: tuple[float, ...]) -> Tensor:
    """The best `score` (distances (S, n) -> (S, K)) over every superposition the seeded search
    visits: each seed's fit is refined once per selection radius. pred, true (n, 3) -> (K,)."""
    distances = _fitted_distances(pred, true, _seeds(pred.shape[0], pred.device))
    best = score(distances).amax(0)
    radius = pred.new_tensor(radii).repeat_interleave(len(distances))[:, None]  # (R*S, 1)
    distances = distances.repeat(len(radii), 1)
    weights = _within(distances, radius)
    for _ in range(SEARCH_ITERATIONS):
        distances = _fitted_distances(pred, true, weights)
        best = torch.maximum(best, score(distances).amax(0))
        refined = _within(distances, radius)
        moving = (refined != weights).any(-1)  # a row whose selection is stable would find the same fit
        weights, radius = refined[moving], radius[moving]
        if not moving.any():
            break
    return best


def _fitted_distances(pred: Tensor, true: Tensor, weights: Tensor) -> Tensor:
    """(S, n) distances (Å) from each residue of `true` to `pred` superposed with each weighting (S, n)."""
    rotation, p_centre, t_centre = _kabsch(pred, true, weights)  # broadcasts over the S rows
    return (_apply(pred, rotation, p_centre, t_centre) - true).norm(dim=-1)


def _within(distances: Tensor, radius: Tensor) -> Tensor:
    """(S, n) 0/1 weights: residues within each row's radius, or the MIN_SELECTED closest if fewer."""
    selected = distances < radius
    k = min(MIN_SELECTED, distances.shape[1])
    too_few = selected.sum(-1) < k
    if too_few.any():  # rare after the first step, and topk over every row would cost more than the rest
        closest = distances[too_few].topk(k, largest=False).indices
        selected[too_few] = torch.zeros_like(selected[too_few]).scatter_(1, closest, True)
    return selected.double()
