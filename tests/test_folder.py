"""The folding network and its losses: shapes, padding, equivariance, frame-free yet chiral losses, overfitting."""

import time
from pathlib import Path

import gemmi
import pytest
import torch

from layerwise.data.structures import AMINO_ACIDS
from layerwise.errors import InputError
from layerwise.models import create_model, list_models
from layerwise.models.folder import (
    DISTOGRAM_BINS,
    PAD,
    PLDDT_BINS,
    FoldConfig,
    FoldNet,
    confidence_geometry,
    fold_loss,
    pair_distances,
    plddt,
)
from layerwise.tasks.structure_metrics import lddt_ca

CYTOCHROMES = Path("/usr/share/doc/theseus/examples/cytochromes")
MAX_CROP = 128


def read_chain(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens (L,), Cα (L, 3) Å and known (L,) of the first polymer chain of the first model, cropped to 128."""
    # ASTRAL files keep serial numbers in columns 73-80, which gemmi would read as element and charge.
    structure = gemmi.read_pdb(str(path), max_line_length=72)
    structure.setup_entities()
    tokens, coords, known = [], [], []
    for residue in structure[0][0].get_polymer():
        info = gemmi.find_tabulated_residue(residue.name)
        code = info.one_letter_code.upper() if info is not None else "X"
        tokens.append(AMINO_ACIDS.index(code) if code in AMINO_ACIDS else len(AMINO_ACIDS))  # else X
        atom = residue.find_atom("CA", "*")
        coords.append([atom.pos.x, atom.pos.y, atom.pos.z] if atom is not None else [0.0, 0.0, 0.0])
        known.append(atom is not None)
    return torch.tensor(tokens[:MAX_CROP]), torch.tensor(coords[:MAX_CROP]), torch.tensor(known[:MAX_CROP])


def batch_of(chains: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], length: int | None = None) -> dict:
    """Chains padded to one length (the longest, or `length`): the inputs and targets of `FoldNet` and `fold_loss`."""
    length = length or max(len(t) for t, _, _ in chains)
    tokens = torch.full((len(chains), length), PAD)
    coords = torch.zeros(len(chains), length, 3)
    coord_mask = torch.zeros(len(chains), length, dtype=torch.bool)
    for i, (t, x, known) in enumerate(chains):
        tokens[i, : len(t)], coords[i, : len(t)], coord_mask[i, : len(t)] = t, x, known
    return {"tokens": tokens, "residue_mask": tokens != PAD, "coords": coords, "coord_mask": coord_mask}


@pytest.fixture(scope="module")
def two_chains() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    # Yeast iso-1 (108 residues) and a bacterial cytochrome c (103): one fold, different sequences.
    return [read_chain(CYTOCHROMES / "d1cih__.pdb.gz"), read_chain(CYTOCHROMES / "d1lfma_.pdb.gz")]


@pytest.fixture(scope="module")
def small_batch(two_chains) -> dict:
    """The first 30 residues of one chain and 24 of the other, two Cα marked unknown, 2 more padding columns."""
    (t1, x1, k1), (t2, x2, k2) = two_chains
    k2 = k2[:24].clone()
    k2[[3, 17]] = False
    return batch_of([(t1[:30], x1[:30], k1[:30]), (t2[:24], x2[:24], k2)], length=32)


def tiny_model() -> FoldNet:
    torch.manual_seed(0)
    return create_model("fold_xs", geometry_confidence=True).eval()  # as the fold task trains it


def random_rotation(generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]  # a proper rotation, not a reflection
    return q.float()


def test_fold_models_are_registered_for_protein_folding() -> None:
    assert {"fold_xs", "fold_s"} <= set(list_models(modality="protein", task="fold"))
    assert not {"fold_xs", "fold_s"} & set(list_models(task="classify"))
    with pytest.raises(InputError, match="multiple of heads"):
        FoldConfig(dim=30, pair_dim=8, trunk_layers=1, heads=4, pair_blocks=1, structure_iterations=1)


def test_shapes_and_every_parameter_gets_a_finite_gradient(small_batch) -> None:
    model = tiny_model().train()
    b, length = small_batch["tokens"].shape
    out = model(small_batch["tokens"], small_batch["residue_mask"])
    assert out["features"].shape == (b, length, model.num_features)
    assert out["distogram_logits"].shape == (b, length, length, DISTOGRAM_BINS)
    assert out["coords"].shape == (b, length, 3)
    assert out["plddt_logits"].shape == (b, length, PLDDT_BINS)
    assert out["trajectory"].shape == (model.config.structure_iterations + 1, b, length, 3)
    torch.testing.assert_close(out["distogram_logits"], out["distogram_logits"].transpose(1, 2))
    confidence = plddt(out["plddt_logits"])
    assert confidence.shape == (b, length) and ((confidence >= 0) & (confidence <= 100)).all()

    total, stats = fold_loss(out, small_batch["coords"], small_batch["coord_mask"], small_batch["residue_mask"])
    assert set(stats) == {"distogram", "coord", "plddt", "lddt"} and 0.0 <= stats["lddt"] <= 1.0
    total.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"

    model.eval()
    features = model.forward_features(small_batch["tokens"])  # the mask defaults to the non-PAD tokens
    torch.testing.assert_close(features, model(small_batch["tokens"], small_batch["residue_mask"])["features"])
    assert model.forward_head(features, small_batch["residue_mask"], pre_logits=True).shape == (b, model.num_features)
    assert [name for name, _ in model.named_stages()] == ["embed", "trunk1", "structure1", "structure2"]


def test_plddt_is_the_expected_lddt_in_percent() -> None:
    logits = torch.full((1, 2, PLDDT_BINS), -1e4)
    logits[0, 0, 0] = logits[0, 1, PLDDT_BINS - 1] = 0.0  # certain of the lowest / highest bin
    torch.testing.assert_close(plddt(logits), torch.tensor([[1.0, 99.0]]))


def test_confidence_geometry_is_the_distograms_expected_lddt_and_neighbour_counts() -> None:
    generator = torch.Generator().manual_seed(0)
    coords = 8 * torch.randn(2, 30, 3, generator=generator)
    logits = 2 * torch.randn(2, 30, 30, DISTOGRAM_BINS, generator=generator)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 25:] = False
    geometry = confidence_geometry(coords, logits, mask)

    # The same by brute force over every bin: each bin's mass spread evenly over it (the open ones one bin wide), so a
    # bin counts with the share of it that lies within t of the predicted distance.
    width = 20.0 / (DISTOGRAM_BINS - 2)
    starts = 2.0 + width * (torch.arange(DISTOGRAM_BINS) - 1.0)  # bin 0 covers [2 - width, 2), bin 1 [2, 2 + width)
    probs, distance = logits.softmax(-1), pair_distances(coords)

    def share(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:  # P(low < D < high)
        overlap = torch.minimum(starts + width, high[..., None]) - torch.maximum(starts, low[..., None])
        return (probs * overlap.clamp(min=0) / width).sum(-1)

    pairs = mask[:, :, None] & mask[:, None, :] & ~torch.eye(30, dtype=torch.bool)
    near = share(torch.full_like(distance, -1.0), torch.full_like(distance, 15.0)) * pairs
    within = sum(share(distance - t, distance + t) for t in (0.5, 1, 2, 4)) / 4
    expected = [(within * near).sum(-1) / near.sum(-1), near.sum(-1) / 10]
    expected += [(torch.sigmoid((radius - distance) / 0.25) * pairs).sum(-1) / 10 for radius in (8, 10, 15)]
    torch.testing.assert_close(geometry[mask], torch.stack(expected, -1)[mask], atol=1e-5, rtol=1e-5)
    # Continuous in the coordinates: a residue 8 Å from another, moved 1e-4 Å inside that radius, moves every
    # feature by about that much, never by a whole neighbour (0.1) as a hard count would.
    at_radius = coords.clone()
    at_radius[0, 1] = at_radius[0, 0] + torch.tensor([8.0, 0.0, 0.0])
    across = at_radius.clone()
    across[0, 1, 0] -= 1e-4  # from 8 Å (a hard count: not within 8 Å) to just within
    moved = confidence_geometry(across, logits, mask) - confidence_geometry(at_radius, logits, mask)
    assert moved[mask].abs().max() < 1e-3
    assert ((geometry[..., 0] >= 0) & (geometry[..., 0] <= 1)).all()


def test_a_network_saved_before_the_geometry_inputs_rebuilds_from_its_empty_config() -> None:
    older, trained = create_model("fold_xs"), tiny_model()
    assert older.geometry_projection is None and "geometry_projection.weight" not in older.state_dict()
    # The names of the confidence head's weights in runs saved before the geometry, which must load unchanged.
    head = {name for name in older.state_dict() if name.startswith("confidence.")}
    assert head == {f"confidence.{layer}.{kind}" for layer in (0, 1, 3) for kind in ("weight", "bias")}
    assert set(trained.state_dict()) - set(older.state_dict()) == {
        "geometry_projection.weight",
        "geometry_projection.bias",
    }


def test_padding_does_not_change_the_outputs_of_real_residues(small_batch) -> None:
    model = tiny_model()
    tokens, mask = small_batch["tokens"], small_batch["residue_mask"]
    padded = torch.cat([tokens, torch.full((2, 9), PAD)], dim=1)
    with torch.no_grad():
        short, long = model(tokens, mask), model(padded, padded != PAD)
    pairs = mask[:, :, None] & mask[:, None, :]
    n = tokens.shape[1]
    for key in ("features", "coords", "plddt_logits"):
        torch.testing.assert_close(long[key][:, :n][mask], short[key][mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        long["distogram_logits"][:, :n, :n][pairs], short["distogram_logits"][pairs], atol=1e-4, rtol=1e-4
    )


def test_structure_module_is_rotation_and_translation_equivariant() -> None:
    model = tiny_model()
    structure = model.structure
    generator = torch.Generator().manual_seed(1)
    for layer in structure.layers:  # the coordinate step starts at zero, which would make any module "equivariant"
        torch.nn.init.normal_(layer.step.weight, std=0.5, generator=generator)
    b, length = 2, 12
    h = torch.randn(b, length, model.config.dim, generator=generator)
    z = torch.randn(b, length, length, model.config.pair_dim, generator=generator)
    x = 8 * torch.randn(b, length, 3, generator=generator)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1, 9:] = False
    rotation, shift = random_rotation(generator), torch.tensor([5.0, -3.0, 12.0])
    with torch.no_grad():
        h_out, trajectory = structure(h, z, x, mask)
        h_moved, trajectory_moved = structure(h, z, x @ rotation.T + shift, mask)
    assert (trajectory[-1] - x)[mask].abs().max() > 1.0  # the updates did move the coordinates
    torch.testing.assert_close(trajectory_moved[:, mask], (trajectory @ rotation.T + shift)[:, mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(h_moved[mask], h_out[mask], atol=1e-4, rtol=1e-4)  # features are invariant


def test_loss_ignores_the_target_frame_but_not_its_mirror_image(small_batch) -> None:
    model = tiny_model()
    with torch.no_grad():
        out = model(small_batch["tokens"], small_batch["residue_mask"])
    coords, coord_mask, mask = small_batch["coords"], small_batch["coord_mask"], small_batch["residue_mask"]
    rotation, shift = random_rotation(torch.Generator().manual_seed(2)), torch.tensor([-20.0, 7.0, 3.0])
    total, stats = fold_loss(out, coords, coord_mask, mask)
    moved_total, moved_stats = fold_loss(out, coords @ rotation.T + shift, coord_mask, mask)
    torch.testing.assert_close(moved_total, total, atol=1e-4, rtol=0)
    assert moved_stats == pytest.approx(stats, abs=1e-4)

    # A perfect prediction: the distogram and distance terms cannot tell it from its mirror image, the aligned
    # error (proper rotations only) can.
    perfect = dict(out, trajectory=coords.expand_as(out["trajectory"]), coords=coords)
    mirror = coords * torch.tensor([-1.0, 1.0, 1.0])
    _, right = fold_loss(perfect, coords, coord_mask, mask)
    _, wrong = fold_loss(perfect, mirror, coord_mask, mask)
    assert right["distogram"] == pytest.approx(wrong["distogram"], abs=1e-4)
    assert right["lddt"] == pytest.approx(1.0) and wrong["lddt"] == pytest.approx(1.0)
    assert right["coord"] < 1e-3 < 0.1 < wrong["coord"]


def test_no_nan_when_a_chain_has_fewer_than_three_known_residues(small_batch) -> None:
    model = tiny_model().train()
    coord_mask = small_batch["coord_mask"].clone()
    coord_mask[1] = False
    coord_mask[1, [4, 11]] = True  # two known Cα: every superposition is degenerate
    out = model(small_batch["tokens"], small_batch["residue_mask"])
    coords = small_batch["coords"].clone()
    coords[~coord_mask] = float("nan")  # unknown positions may hold anything
    total, stats = fold_loss(out, coords, coord_mask, small_batch["residue_mask"])
    total.backward()
    assert torch.isfinite(total) and all(map(torch.isfinite, map(torch.tensor, stats.values())))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    coord_mask[:] = False  # nothing known at all: every term is 0, still finite
    total, _ = fold_loss(model(small_batch["tokens"], small_batch["residue_mask"]), coords, coord_mask, coord_mask)
    assert torch.isfinite(total)


@pytest.mark.slow
def test_the_default_model_memorises_two_real_chains(two_chains) -> None:
    batch = batch_of(two_chains)
    torch.manual_seed(0)
    # As the fold task trains it; fold_s gets there too (151 steps) but takes 70 s on 2 cores, fold_xs 25 s.
    model = create_model("fold_xs", geometry_confidence=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    start, steps, lddt = time.perf_counter(), 0, 0.0
    while steps < 400:
        out = model(batch["tokens"], batch["residue_mask"])
        loss, stats = fold_loss(out, batch["coords"], batch["coord_mask"], batch["residue_mask"])
        lddt = stats["lddt"]
        if lddt >= 0.9:
            break  # before the update: the weights kept are the ones that scored
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps += 1
    print(f"fold_xs: lDDT-Cα {lddt:.3f} after {steps} steps, {time.perf_counter() - start:.0f} s")
    assert lddt >= 0.9
    model.eval()
    with torch.no_grad():
        out = model(batch["tokens"], batch["residue_mask"])
    assert lddt_ca(out["coords"], batch["coords"], batch["coord_mask"]).min() > 0.8  # both chains, not one
