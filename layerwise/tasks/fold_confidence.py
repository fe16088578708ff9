"""After training, the pLDDT head is fitted once more, on whole training chains (AlphaFold, too, trains its
confidence in a later stage than the structure).

Why: training folds 128-residue crops, so during training the head learns what lDDT a crop's structure gets; a
whole chain has more neighbours per residue, and the head's inputs (`confidence_geometry`) shift with them. On the
fold benchmark (fold_xs, 900 s of training) the head trained on crops ranked the residues of the validation chains
by Pearson 0.21-0.24, and the same head fitted here 0.44; a linear fit of its inputs on crops reached 0.30-0.38,
on whole chains 0.45. Only the head's weights change — the structure, the distogram and the monitored lDDT-Cα stay as
trained — and only training chains are used, so the validation chains stay held out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from layerwise.data.crops import sequence_batch
from layerwise.data.structures import ProteinChain
from layerwise.models.folder import PLDDT_BINS, FoldNet
from layerwise.runtime import model_device
from layerwise.tasks.structure_metrics import lddt_scored, per_residue_lddt

FIT_CHAINS = 400  # training chains the head is fitted on: ~70k residues in the demo, ~20 s of folding on 2 cores
FIT_LENGTH = 512  # residues: longer chains are cut (the L x L pair tensors of a batch must fit in memory)
FIT_STEPS = 4000  # ~7 s on 2 cores; 1,500 at 1e-3 left the head short of its inputs (Pearson 0.31 vs 0.44)
FIT_EPOCHS = 60  # at most: on the demo's 68k residues FIT_STEPS is 60 passes; on a few chains, far fewer steps
# (4,000 steps on 16 small chains drove the head's logits to ~170: an overfitted, overconfident head)
FIT_BATCH = 1024  # residues per step, drawn at random from all the chains'
FIT_LR = 3e-3
FOLD_BATCH = 8  # chains folded at once


@torch.no_grad()
def head_inputs(network: FoldNet, chains: list[ProteinChain]) -> dict[str, torch.Tensor]:
    """What the pLDDT head reads for every residue of `chains` that lDDT scores, and the bin of its true lDDT:
    {"structure_features": (N, dim), "confidence_geometry": (N, GEOMETRY_FEATURES) if the network has it,
    "lddt_bin": (N,)}."""
    network.eval()
    device = model_device(network)
    parts: dict[str, list[torch.Tensor]] = {}
    ordered = sorted(chains, key=lambda c: len(c.sequence))  # similar lengths together: little padding
    for start in range(0, len(ordered), FOLD_BATCH):
        group = ordered[start : start + FOLD_BATCH]
        tokens, residue_mask = sequence_batch([c.sequence[:FIT_LENGTH] for c in group])
        true = torch.zeros(*tokens.shape, 3)
        known = torch.zeros(tokens.shape, dtype=torch.bool)
        for row, chain in enumerate(group):
            n = min(len(chain.sequence), FIT_LENGTH)
            true[row, :n], known[row, :n] = torch.from_numpy(chain.ca[:n]), torch.from_numpy(chain.mask[:n])
        outputs = network(tokens.to(device), residue_mask.to(device))
        lddt = per_residue_lddt(outputs["coords"].float().cpu(), true, known)
        scored = lddt_scored(true, known)
        rows = {
            key: outputs[key].cpu()[scored] for key in ("structure_features", "confidence_geometry") if key in outputs
        }
        rows["lddt_bin"] = (lddt[scored] * PLDDT_BINS).long().clamp(max=PLDDT_BINS - 1)
        for key, value in rows.items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


def fit_confidence(network: FoldNet, chains: list[ProteinChain], seed: int = 0) -> dict:
    """Fit the pLDDT head (`FoldNet.confidence` and its geometry projection) to the true per-residue lDDT of the
    network's own structures of up to FIT_CHAINS whole chains (a seeded draw). Returns what was done, for the run's
    metrics: {"chains", "residues", "steps", "loss_before", "loss_after"} (cross-entropy over all those residues)."""
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randperm(len(chains), generator=generator)[:FIT_CHAINS].tolist()
    inputs = head_inputs(network, [chains[i] for i in drawn]) if drawn else {}
    if len(inputs.get("lddt_bin", ())) == 0:  # no residue lDDT scores: the head stays as trained
        return {"chains": len(drawn), "residues": 0, "steps": 0, "loss_before": None, "loss_after": None}
    device = model_device(network)
    features, target = inputs["structure_features"].to(device), inputs["lddt_bin"].to(device)
    geometry = inputs["confidence_geometry"].to(device) if "confidence_geometry" in inputs else None
    head = [network.confidence] + ([network.geometry_projection] if network.geometry_projection is not None else [])
    parameters = [p for module in head for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=FIT_LR)

    def loss_on(index: torch.Tensor | slice) -> torch.Tensor:
        logits = network.plddt_logits(features[index], None if geometry is None else geometry[index])
        return F.cross_entropy(logits.float(), target[index])

    with torch.no_grad():
        before = float(loss_on(slice(None)))
    steps = min(FIT_STEPS, math.ceil(FIT_EPOCHS * len(target) / FIT_BATCH))
    for _ in range(steps):
        index = torch.randint(len(target), (FIT_BATCH,), generator=generator).to(device)
        loss = loss_on(index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for p in network.parameters():
        p.grad = None  # the head's last gradients are not part of the trained network
    network.eval()
    with torch.no_grad():
        after = float(loss_on(slice(None)))
    return {"chains": len(drawn), "residues": len(target), "steps": steps, "loss_before": round(before, 4),
            "loss_after": round(after, 4)}  # fmt: skip
