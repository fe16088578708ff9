"""Sequence -> Cα coordinates: a small AlphaFold-style folding network and its losses.

tokens (B, L) -> a window embedding + sequence trunk (pre-norm attention with a learned relative-position bias)
-> per-residue features (B, L, dim) -> pair representation (B, L, L, pair_dim), refined by triangle
multiplicative updates -> three heads: a distogram over Cα-Cα distances; a structure module of E(3)-equivariant
(EGNN) updates that refines start coordinates projected from the features into Cα coordinates; a per-residue
confidence (pLDDT) read from the structure module's final residue features and, in runs trained since the geometry
inputs were added, from how the predicted structure agrees with the network's own distogram.

Only sequence separations are used, never absolute positions, so a model trained on crops of <= 128 residues
runs unchanged on whole chains of any length.

`fold_loss` trains all three: distogram cross-entropy, a frame-free but chirality-aware coordinate loss, and
pLDDT cross-entropy against the lDDT of the model's own (detached) prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layerwise.data.crops import PAD
from layerwise.errors import InputError
from layerwise.models.registry import register_model
from layerwise.tasks.structure_metrics import lddt_ca, lddt_scored, per_residue_lddt, superpose

NUM_TOKENS = PAD + 1  # amino acids 0..19, X (unknown) 20, PAD 21
MAX_OFFSET = 32  # sequence separations beyond ±32 residues share one relative-position bucket (AF2's relpos)
WINDOW = 9  # residues: each residue's embedding starts from its local sequence, ±4 either side
OUTER_RANK = 8  # channels per residue whose outer product seeds the pair representation: 8 x 8 = 64 per pair
DISTOGRAM_BINS = 36  # first bin < 2 Å, 34 bins over 2-22 Å, last bin > 22 Å
DISTOGRAM_MIN, DISTOGRAM_MAX = 2.0, 22.0  # Å
PLDDT_BINS = 50  # equal bins over lDDT in [0, 1]
LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)  # Å, lDDT's
NEIGHBOUR_RADII = (8.0, 10.0, 15.0)  # Å: predicted neighbour counts the confidence head sees (15 = lDDT's radius)
COUNT_SOFTNESS = 0.25  # Å: a neighbour at the radius counts half, 0.5 Å inside it 0.88
GEOMETRY_FEATURES = 2 + len(NEIGHBOUR_RADII)  # see `confidence_geometry`
DISTANCE_FEATURES = 16  # Gaussians over 0..DISTOGRAM_MAX Å: how the structure module sees its current distances
MASKED = -1e9  # attention logit of a padding key: exp() underflows to exactly 0, yet an all-padding row stays finite
START_SCALE = 10.0  # Å per unit of the start-coordinate projection: features are O(1), a protein is O(10) Å
EPS = 1e-8  # inside square roots, so a zero distance (i == j) has a finite gradient

# fold_loss. Clamp and length scale as in AF2's FAPE; the weights as in AF2 (distogram 0.3, pLDDT 0.01).
CLAMP = 10.0  # Å: an aligned Cα error beyond this counts as this, so a misplaced loop does not dominate...
CLAMPED_FRACTION = 0.9  # ...in 90% of the aligned loss; AF2 leaves FAPE unclamped in 10% of batches
LENGTH_SCALE = 10.0  # Å: coordinate losses are divided by it, so they are O(1) like the cross-entropies
LOCAL_CUTOFF = 15.0  # Å: the distance loss covers pairs closer than this in the true structure (lDDT's radius)
DISTOGRAM_WEIGHT, ALIGNED_WEIGHT, DISTANCE_WEIGHT, PLDDT_WEIGHT = 0.3, 1.0, 1.0, 0.01


@dataclass(frozen=True)
class FoldConfig:
    dim: int  # per-residue features
    pair_dim: int  # per-pair features
    trunk_layers: int
    heads: int
    pair_blocks: int
    structure_iterations: int
    # pLDDT also reads `confidence_geometry`. The fold task trains with True; False rebuilds runs saved before it.
    geometry_confidence: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise InputError(f"FoldConfig: dim {self.dim} must be a multiple of heads {self.heads}")
        if min(self.dim, self.pair_dim, self.trunk_layers, self.heads, self.structure_iterations) < 1:
            raise InputError("FoldConfig: dim, pair_dim, trunk_layers, heads and structure_iterations must be >= 1")
        if self.pair_blocks < 0:
            raise InputError(f"FoldConfig: pair_blocks must be >= 0, got {self.pair_blocks}")


def relative_offsets(length: int, device: torch.device) -> torch.Tensor:
    """(L, L) bucket of j - i clipped to ±MAX_OFFSET, as indices 0..2*MAX_OFFSET.

    Only separations, never absolute positions: a crop of a chain sees the same offsets as the whole chain,
    and chains longer than any training crop need no new positions."""
    index = torch.arange(length, device=device)
    return (index[None, :] - index[:, None]).clamp(-MAX_OFFSET, MAX_OFFSET) + MAX_OFFSET


def pair_distances(x: torch.Tensor) -> torch.Tensor:
    """(B, L, 3) -> (B, L, L) Euclidean distances, with a finite gradient at zero."""
    return ((x[:, :, None] - x[:, None, :]).square().sum(-1) + EPS).sqrt()


def distogram_bin(distance: torch.Tensor) -> torch.Tensor:
    """Distances (Å) -> distogram bin indices 0..DISTOGRAM_BINS-1."""
    edges = torch.linspace(DISTOGRAM_MIN, DISTOGRAM_MAX, DISTOGRAM_BINS - 1, device=distance.device)
    return torch.bucketize(distance.contiguous(), edges.to(distance.dtype))


def confidence_geometry(
    coords: torch.Tensor, distogram_logits: torch.Tensor, residue_mask: torch.Tensor
) -> torch.Tensor:
    """What pLDDT reads besides the residue features: (B, L, GEOMETRY_FEATURES), per residue i

      agreement: the lDDT the network's own distogram expects of its coordinates — over the pairs (i, j) weighted by
        P(d_ij < 15 Å), the mean over lDDT's thresholds t of P(|d_ij - d̂_ij| < t), d the distogram's distance and
        d̂ the predicted structure's;
      expected neighbours: Σ_j P(d_ij < 15 Å) / 10;
      predicted neighbours: the residues within 8, 10 and 15 Å in the predicted structure (soft counts), / 10.

    Why: the residue features alone ranked the true per-residue lDDT poorly (Pearson 0.10-0.23 for linear fits on
    whole training chains, scored on the fold benchmark's validation chains); with these, 0.32-0.45. Where the
    structure module disagrees with the distogram, or the distogram is unsure, the structure is more often wrong.
    The geometry is computed from detached coordinates and distogram: the pLDDT loss must not move the structure to
    make its own task easier (the residue features it reads are not detached, as in AlphaFold)."""
    coords, probs = coords.detach().float(), distogram_logits.detach().float().softmax(-1)
    length = coords.shape[1]
    pairs = residue_mask[:, :, None] & residue_mask[:, None, :]
    pairs = pairs & ~torch.eye(length, dtype=torch.bool, device=coords.device)
    distance = pair_distances(coords)  # (B, L, L) Å
    # Every feature is continuous in the coordinates (each bin's mass spread evenly over it; counts through a
    # sigmoid), so the float differences between PyTorch and an exported graph stay float-sized: a hard count or
    # bin edge turns 1e-6 Å into a whole neighbour. The two open bins are taken one bin wide.
    cumulative = probs.cumsum(-1)  # (B, L, L, bins): [k] = mass of bins 0..k
    width = (DISTOGRAM_MAX - DISTOGRAM_MIN) / (DISTOGRAM_BINS - 2)

    def below(x: torch.Tensor) -> torch.Tensor:  # P(D < x), D the distogram's distance: gathers, not a bins axis
        position = ((x - DISTOGRAM_MIN) / width + 1).clamp(0, DISTOGRAM_BINS)  # in bins from the first bin's start
        index = position.floor().clamp(max=DISTOGRAM_BINS - 1)
        up_to = cumulative.gather(-1, index.long()[..., None])[..., 0]  # through the bin x falls in
        return up_to - (1 - (position - index)) * probs.gather(-1, index.long()[..., None])[..., 0]

    near = below(torch.full_like(distance, LOCAL_CUTOFF)) * pairs  # (B, L, L): P(d_ij < 15 Å)
    within = sum(below(distance + t) - below(distance - t) for t in LDDT_THRESHOLDS) / len(LDDT_THRESHOLDS)
    agreement = (within * near).sum(-1) / near.sum(-1).clamp(min=EPS)
    counts = [(torch.sigmoid((radius - distance) / COUNT_SOFTNESS) * pairs).sum(-1) / 10 for radius in NEIGHBOUR_RADII]
    return torch.stack([agreement, near.sum(-1) / 10, *counts], dim=-1)


def plddt(plddt_logits: torch.Tensor) -> torch.Tensor:
    """pLDDT logits (B, L, PLDDT_BINS) -> expected lDDT in [0, 100] per residue (B, L)."""
    centres = (torch.arange(PLDDT_BINS, device=plddt_logits.device) + 0.5) / PLDDT_BINS  # (bins,) in (0, 1)
    return 100.0 * (plddt_logits.float().softmax(-1) * centres).sum(-1)


class WindowEmbedding(nn.Module):
    """tokens (B, L) -> (B, L, D): each residue's embedding plus a convolution over its neighbours' embeddings.

    Attention with relative positions can learn to tell residues apart by their neighbours, but slowly (lDDT sat
    at ~0.3 for the first ~70 steps of the two-chain overfit without this); the window gives every residue a
    local-sequence signature from the first step. Padding is zeroed first, so it reads as the convolution's own
    zero padding and a chain's features do not depend on how much padding follows it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(NUM_TOKENS, dim, padding_idx=PAD)
        self.window = nn.Conv1d(dim, dim, WINDOW, padding=WINDOW // 2)

    def forward(self, tokens: torch.Tensor, residue_mask: torch.Tensor) -> torch.Tensor:
        e = self.tokens(tokens).masked_fill(~residue_mask[..., None], 0.0)  # (B, L, D)
        return e + self.window(e.transpose(1, 2)).transpose(1, 2)  # (B, D, L) for the convolution


class SequenceBlock(nn.Module):
    """Pre-norm transformer encoder block; attention logits get a learned bias per relative offset and head."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.offset_bias = nn.Embedding(2 * MAX_OFFSET + 1, heads)
        self.proj = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), offsets (L, L) buckets, key_bias (B, 1, 1, L) 0 or MASKED -> (B, L, D)."""
        b, length, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Contiguous copies, the same values: for a strided query the CPU attention kernel returns (B, L, H, head_dim)
        # memory order but the ONNX exporter's decomposition of it (B, H, L, head_dim), so the reshape below, traced
        # as a view, fails to export.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # each (B, H, L, head_dim)
        bias = self.offset_bias(offsets).permute(2, 0, 1) + key_bias  # (H, L, L) + (B, 1, 1, L) -> (B, H, L, L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, H, L, head_dim)
        x = x + self.proj(y.transpose(1, 2).reshape(b, length, d))
        return x + self.mlp(self.mlp_norm(x))


class PairEmbedding(nn.Module):
    """Residue features (B, L, D) -> pair features (B, L, L, C): outer sum + low-rank outer product + offset."""

    def __init__(self, dim: int, pair_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.left = nn.Linear(dim, pair_dim)
        self.right = nn.Linear(dim, pair_dim, bias=False)
        self.outer = nn.Linear(dim, 2 * OUTER_RANK)
        self.outer_proj = nn.Linear(OUTER_RANK * OUTER_RANK, pair_dim, bias=False)
        self.offset = nn.Embedding(2 * MAX_OFFSET + 1, pair_dim)

    def forward(self, h: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        a, b = self.outer(h).chunk(2, dim=-1)  # each (B, L, R)
        # The outer sum alone gives each pair only f(i) + g(j); the product lets pair (i, j) be more than that.
        outer = (a[:, :, None, :, None] * b[:, None, :, None, :]).flatten(-2)  # (B, L, L, R*R)
        return self.left(h)[:, :, None] + self.right(h)[:, None, :] + self.outer_proj(outer) + self.offset(offsets)


class TriangleMultiplication(nn.Module):
    """AF2's triangle multiplicative update: pair (i, j) gathers, over every third residue k, the product of
    the edges (i, k) and (j, k) ("outgoing") or (k, i) and (k, j) ("incoming") — how distance geometry's
    triangle inequality can be learnt. Pre-norm, gated, added to the input."""

    def __init__(self, pair_dim: int, outgoing: bool) -> None:
        super().__init__()
        self.equation = "bikc,bjkc->bijc" if outgoing else "bkic,bkjc->bijc"
        self.norm = nn.LayerNorm(pair_dim)
        self.edges = nn.Linear(pair_dim, 4 * pair_dim)  # a, a's gate, b, b's gate
        self.gate = nn.Linear(pair_dim, pair_dim)
        self.out_norm = nn.LayerNorm(pair_dim)
        self.out = nn.Linear(pair_dim, pair_dim)

    def forward(self, z: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        """z (B, L, L, C), pair_mask (B, L, L, 1) float -> (B, L, L, C)."""
        x = self.norm(z)
        a, a_gate, b, b_gate = self.edges(x).chunk(4, dim=-1)
        a = a * a_gate.sigmoid() * pair_mask  # padding edges contribute nothing to the sum over k
        b = b * b_gate.sigmoid() * pair_mask
        update = self.out(self.out_norm(torch.einsum(self.equation, a, b)))
        return z + self.gate(x).sigmoid() * update


class PairTransition(nn.Module):
    """Pre-norm 2x MLP on each pair, added to the input."""

    def __init__(self, pair_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(pair_dim), nn.Linear(pair_dim, 2 * pair_dim), nn.ReLU(), nn.Linear(2 * pair_dim, pair_dim)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.mlp(z)


class PairBlock(nn.Module):
    """Outgoing then incoming triangle update, then a transition: (B, L, L, C) -> (B, L, L, C)."""

    def __init__(self, pair_dim: int) -> None:
        super().__init__()
        self.outgoing = TriangleMultiplication(pair_dim, outgoing=True)
        self.incoming = TriangleMultiplication(pair_dim, outgoing=False)
        self.transition = PairTransition(pair_dim)

    def forward(self, z: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        return self.transition(self.incoming(self.outgoing(z, pair_mask), pair_mask))


class EquivariantUpdate(nn.Module):
    """One EGNN layer (Satorras et al. 2021) conditioned on the pair representation, with attention weights.

    m_ij = φ_m(h_i, h_j, z_ij, rbf(|x_i - x_j|)) (B, L, L, C);  per head k, a_ij^k = softmax_j(w_k · m_ij) over the
    real residues and x_i += mean_k Σ_j a_ij^k (x_i - x_j) tanh(φ_x^k(m_ij));  h_i += φ_h(h_i, Σ_j a_ij m_ij).
    Every φ sees only invariants and x moves along differences of x, so rotating or translating x rotates or
    translates the output coordinates.
    """

    def __init__(self, dim: int, pair_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.source = nn.Linear(dim, pair_dim)
        self.target = nn.Linear(dim, pair_dim, bias=False)
        self.pair = nn.Linear(pair_dim, pair_dim, bias=False)
        self.distance = nn.Linear(DISTANCE_FEATURES, pair_dim, bias=False)
        self.message = nn.Sequential(nn.SiLU(), nn.Linear(pair_dim, pair_dim), nn.SiLU())
        self.attend = nn.Linear(pair_dim, heads)
        self.step = nn.Linear(pair_dim, heads)
        self.node = nn.Sequential(nn.Linear(dim + heads * pair_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        # Zero at init: training starts from the start coordinates rather than a random deformation of them.
        nn.init.zeros_(self.step.weight)
        nn.init.zeros_(self.step.bias)

    def forward(
        self, h: torch.Tensor, x: torch.Tensor, z: torch.Tensor, key_bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, L, D), x (B, L, 3) Å, z (B, L, L, C), key_bias (B, 1, L, 1) 0 or MASKED -> new (h, x)."""
        delta = x[:, :, None] - x[:, None, :]  # (B, L, L, 3): x_i - x_j
        distance = (delta.square().sum(-1, keepdim=True) + EPS).sqrt()  # (B, L, L, 1)
        centres = torch.linspace(0.0, DISTOGRAM_MAX, DISTANCE_FEATURES, device=x.device, dtype=x.dtype)
        width = DISTOGRAM_MAX / (DISTANCE_FEATURES - 1)
        rbf = torch.exp(-(((distance - centres) / width) ** 2))  # (B, L, L, DISTANCE_FEATURES)
        hn = self.norm(h)
        m = self.message(
            self.source(hn)[:, :, None] + self.target(hn)[:, None, :] + self.pair(z) + self.distance(rbf)
        )  # (B, L, L, C)
        # Attention rather than EGNN's plain mean over j: a residue can move towards a few chosen partners
        # (a contact) instead of 1/N of the way towards each; with tanh the move stays within the farthest
        # partner's distance, so coordinates cannot blow up however large the weights grow in training.
        attention = (self.attend(m) + key_bias).softmax(dim=2)  # (B, L, L, K), sums to 1 over j
        moves = (attention * self.step(m).tanh()).mean(-1, keepdim=True)  # (B, L, L, 1)
        x = x + (delta * moves).sum(2)
        gathered = torch.einsum("bijk,bijc->bikc", attention, m).flatten(2)  # (B, L, K*C)
        h = h + self.node(torch.cat([hn, gathered], dim=-1))
        return h, x


class StructureModule(nn.Module):
    """`iterations` EGNN updates with their own weights: (h, pair, start coordinates) -> (h, Cα coordinates)."""

    def __init__(self, dim: int, pair_dim: int, heads: int, iterations: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EquivariantUpdate(dim, pair_dim, heads) for _ in range(iterations))

    def forward(
        self, h: torch.Tensor, z: torch.Tensor, x: torch.Tensor, residue_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, L, D), z (B, L, L, C), x (B, L, 3) Å, residue_mask (B, L) bool -> final h (B, L, D) and the
        coordinates before and after every update (iterations + 1, B, L, 3), the last being the prediction."""
        key_bias = torch.zeros(residue_mask.shape, dtype=h.dtype, device=h.device).masked_fill(~residue_mask, MASKED)
        trajectory = [x]
        for layer in self.layers:
            h, x = layer(h, x, z, key_bias[:, None, :, None])
            trajectory.append(x)
        return h, torch.stack(trajectory)


class FoldNet(nn.Module):
    """tokens (B, L) + residue_mask (B, L) -> distogram, Cα coordinates and pLDDT (see `forward`)."""

    def __init__(self, config: FoldConfig) -> None:
        super().__init__()
        self.config = config
        self.num_features = config.dim
        self.embed = WindowEmbedding(config.dim)
        self.trunk = nn.ModuleList(SequenceBlock(config.dim, config.heads) for _ in range(config.trunk_layers))
        self.norm = nn.LayerNorm(config.dim)
        self.pair_embed = PairEmbedding(config.dim, config.pair_dim)
        self.pair_blocks = nn.ModuleList(PairBlock(config.pair_dim) for _ in range(config.pair_blocks))
        self.pair_norm = nn.LayerNorm(config.pair_dim)
        self.distogram = nn.Linear(config.pair_dim, DISTOGRAM_BINS)
        self.start = nn.Linear(config.dim, 3)
        self.structure = StructureModule(config.dim, config.pair_dim, config.heads, config.structure_iterations)
        self.confidence = nn.Sequential(
            nn.LayerNorm(config.dim), nn.Linear(config.dim, config.dim), nn.ReLU(), nn.Linear(config.dim, PLDDT_BINS)
        )
        self.geometry_projection = nn.Linear(GEOMETRY_FEATURES, config.dim) if config.geometry_confidence else None

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        # Stages whose output is per residue (B, L, D); pair blocks (B, L, L, C) fit no probe's view of a stage.
        trunk = [(f"trunk{i + 1}", block) for i, block in enumerate(self.trunk)]
        structure = [(f"structure{i + 1}", layer) for i, layer in enumerate(self.structure.layers)]
        return [("embed", self.embed), *trunk, *structure]

    def forward_features(self, tokens: torch.Tensor, residue_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, L) int -> per-residue features (B, L, dim), zero at padding.
        residue_mask (B, L) bool defaults to `tokens != PAD`."""
        mask = tokens != PAD if residue_mask is None else residue_mask
        offsets = relative_offsets(tokens.shape[1], tokens.device)
        key_bias = torch.zeros(mask.shape, device=tokens.device).masked_fill(~mask, MASKED)[:, None, None, :]
        h = self.embed(tokens, mask)
        for block in self.trunk:
            h = block(h, offsets, key_bias)
        return self.norm(h).masked_fill(~mask[..., None], 0.0)

    def forward_head(
        self, features: torch.Tensor, residue_mask: torch.Tensor | None = None, pre_logits: bool = False
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        """features (B, L, dim) -> the output dict of `forward`; with pre_logits, the mean over real residues
        (B, dim) as an embedding of the chain. residue_mask (B, L) bool defaults to every position."""
        if residue_mask is None:
            residue_mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        real = residue_mask[..., None].to(features.dtype)  # (B, L, 1)
        if pre_logits:
            return (features * real).sum(1) / real.sum(1).clamp(min=1)
        length = features.shape[1]
        pair_mask = real[:, :, None] * real[:, None, :]  # (B, L, L, 1)
        z = self.pair_embed(features, relative_offsets(length, features.device))
        for block in self.pair_blocks:
            z = block(z, pair_mask)
        z = self.pair_norm(z)
        logits = self.distogram(z)
        # A start read from the features, not a fixed ideal helix: a helix of L residues is a 1.5 L Å rod that
        # the updates must crush 5-10x into a globule, with nearly every error beyond the loss's clamp (in an
        # earlier version of this model, two-chain overfit lDDT after 230 steps: 0.31 from a helix, 0.55 from
        # this). The updates keep the start's frame, so the prediction's frame is arbitrary; every loss and
        # metric is frame-free.
        start = START_SCALE * self.start(features)  # (B, L, 3) Å
        h, trajectory = self.structure(features, z, start, residue_mask)
        distogram_logits = (logits + logits.transpose(1, 2)) / 2  # d(i, j) = d(j, i)
        outputs = {
            "features": features,
            "distogram_logits": distogram_logits,
            "coords": trajectory[-1],
            "trajectory": trajectory,
            "structure_features": h,
        }
        if self.geometry_projection is not None:
            outputs["confidence_geometry"] = confidence_geometry(trajectory[-1], distogram_logits, residue_mask)
        return outputs | {"plddt_logits": self.plddt_logits(h, outputs.get("confidence_geometry"))}

    def plddt_logits(self, structure_features: torch.Tensor, geometry: torch.Tensor | None = None) -> torch.Tensor:
        """The confidence head alone: (B, L, dim) structure features [+ (B, L, GEOMETRY_FEATURES) `confidence_geometry`]
        -> (B, L, PLDDT_BINS), so it can be fitted after training on the network's saved outputs."""
        norm, hidden, activation, out = self.confidence  # a Sequential: runs saved before the geometry have its names
        x = hidden(norm(structure_features))
        if self.geometry_projection is not None:
            # In the hidden layer, after the norm: normalising the residue features does not rescale the geometry.
            x = x + self.geometry_projection(geometry)
        return out(activation(x))

    def forward(self, tokens: torch.Tensor, residue_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """tokens (B, L) int, residue_mask (B, L) bool (default `tokens != PAD`) -> {"features": (B, L, dim),
        "distogram_logits": (B, L, L, DISTOGRAM_BINS), "coords": (B, L, 3) Å, "plddt_logits": (B, L, PLDDT_BINS),
        "trajectory": (structure_iterations + 1, B, L, 3) Å, the start and every update's output, last = coords,
        "structure_features": (B, L, dim) the structure module's final residue features, and, where pLDDT reads it,
        "confidence_geometry": (B, L, GEOMETRY_FEATURES)} (those two are what `plddt_logits` reads).
        Outputs at padding positions are meaningless; those of real residues do not depend on the padding."""
        mask = tokens != PAD if residue_mask is None else residue_mask
        return self.forward_head(self.forward_features(tokens, mask), mask)


class FoldExport(nn.Module):
    """`FoldNet` as an export graph: what a user reads of its output dict, as a tuple (ONNX outputs are positional).

    tokens (B, L) int64, residue_mask (B, L) bool -> coords (B, L, 3) Å, plddt_logits (B, L, PLDDT_BINS),
    distogram_logits (B, L, L, DISTOGRAM_BINS); the network's own forward, nothing recomputed."""

    output_names = ("coords", "plddt_logits", "distogram_logits")

    def __init__(self, network: FoldNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, tokens: torch.Tensor, residue_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.network(tokens, residue_mask)
        return tuple(outputs[name] for name in self.output_names)


def fold_loss(
    outputs: dict[str, torch.Tensor], coords: torch.Tensor, coord_mask: torch.Tensor, residue_mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of `FoldNet` and its parts.

    outputs: `FoldNet.forward`'s dict (its "distogram_logits", "trajectory" and "plddt_logits" are used); coords
    (B, L, 3) true Cα in Å (anything, even NaN, where unknown); coord_mask (B, L) bool, True where the Cα is known;
    residue_mask (B, L) bool. Every term averages over the known residues or pairs of the whole batch, and is 0
    where there are none.

    total = 0.3 distogram + coord + 0.01 plddt, with
      distogram: cross-entropy of the true distance bin, pairs i != j with both Cα known;
      coord: aligned + distance in units of 10 Å, averaged over the structures of the trajectory:
        aligned: Cα error after the best proper-rotation superposition, 0.9 min(|Δ|, 10 Å) + 0.1 |Δ| —
                 rotation and translation invariant, yet a mirror image scores badly;
        distance: mean |d_ij - d_ij_true| over the known pairs closer than 15 Å in the true structure;
      plddt: cross-entropy of the binned per-residue lDDT-Cα of the detached prediction, residues with pairs.
    stats: those three terms unweighted, and "lddt", the batch mean lDDT-Cα of the predicted coordinates.
    """
    known = coord_mask & residue_mask
    true = coords.float().masked_fill(~known[..., None], 0.0)  # unknown Cα may hold NaN; keep them out of sums
    pairs = known[:, :, None] & known[:, None, :] & ~torch.eye(known.shape[1], dtype=torch.bool, device=known.device)
    true_distance = pair_distances(true)

    logits = outputs["distogram_logits"].float()
    distogram_ce = F.cross_entropy(logits[pairs], distogram_bin(true_distance[pairs]), reduction="sum")
    distogram = distogram_ce / pairs.sum().clamp(min=1)

    # Every structure in the trajectory is scored, as AF2 scores every structure-module iteration: each update
    # then learns to improve on the last, and the start gets a direct signal rather than one through all updates.
    trajectory = outputs["trajectory"].float()  # (T, B, L, 3)
    steps = trajectory.shape[0]
    coord = _coordinate_loss(trajectory.flatten(0, 1), true.repeat(steps, 1, 1), known.repeat(steps, 1))
    pred = trajectory[-1]

    scored = lddt_scored(true, known)  # (B, L): residues with a pair to score
    lddt = per_residue_lddt(pred.detach(), true, known)  # (B, L) in [0, 1]
    lddt_bin = (lddt * PLDDT_BINS).long().clamp(max=PLDDT_BINS - 1)
    plddt_ce = F.cross_entropy(outputs["plddt_logits"].float()[scored], lddt_bin[scored], reduction="sum")
    plddt_loss = plddt_ce / scored.sum().clamp(min=1)

    total = DISTOGRAM_WEIGHT * distogram + coord + PLDDT_WEIGHT * plddt_loss
    stats = {
        "distogram": float(distogram.detach()),
        "coord": float(coord.detach()),
        "plddt": float(plddt_loss.detach()),
        "lddt": float(lddt_ca(pred.detach(), true, known).mean()),
    }
    return total, stats


def _coordinate_loss(pred: torch.Tensor, true: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Aligned error + local distance error (see `fold_loss`) of pred (N, L, 3) against true (N, L, 3): a scalar."""
    # The true chain is superposed onto the detached prediction rather than the prediction onto the truth: the
    # errors are the same and no gradient runs through the SVD (unstable for degenerate or < 3-point chains).
    # For a squared error this gradient is even exact (the optimal rotation's own derivative drops out).
    target = superpose(true, pred.detach(), known)
    aligned_error = ((pred - target).square().sum(-1) + EPS).sqrt()  # (N, L) Å
    # AF2's clamp-90%-of-batches in expectation, without the coin: from a start far from the truth nearly every
    # error is beyond the clamp, and a fully clamped loss would give them no gradient at all.
    aligned_error = CLAMPED_FRACTION * aligned_error.clamp(max=CLAMP) + (1 - CLAMPED_FRACTION) * aligned_error
    aligned = (aligned_error * known).sum() / known.sum().clamp(min=1) / LENGTH_SCALE
    true_distance = pair_distances(true)
    local = known[:, :, None] & known[:, None, :] & (true_distance < LOCAL_CUTOFF)
    local &= ~torch.eye(known.shape[1], dtype=torch.bool, device=known.device)
    distance_error = (pair_distances(pred) - true_distance).abs()
    distance = (distance_error * local).sum() / local.sum().clamp(min=1) / LENGTH_SCALE
    return ALIGNED_WEIGHT * aligned + DISTANCE_WEIGHT * distance


# geometry_confidence defaults to False so that a run saved before it existed (model config {}) rebuilds the network
# its weights were saved from; the fold task trains with True and records it in the run's model config.
@register_model("fold_xs", modalities=("protein",), tasks=("fold",))
def fold_xs(geometry_confidence: bool = False) -> FoldNet:
    config = FoldConfig(
        dim=32,
        pair_dim=16,
        trunk_layers=1,
        heads=2,
        pair_blocks=1,
        structure_iterations=2,
        geometry_confidence=geometry_confidence,
    )
    return FoldNet(config)


@register_model("fold_s", modalities=("protein",), tasks=("fold",))
def fold_s(geometry_confidence: bool = False) -> FoldNet:
    config = FoldConfig(
        dim=96,
        pair_dim=32,
        trunk_layers=3,
        heads=4,
        pair_blocks=2,
        structure_iterations=4,
        geometry_confidence=geometry_confidence,
    )
    return FoldNet(config)
