"""Transfer learning: the freeze-then-unfreeze schedule, layer-wise learning rates, and which runs can start which."""

from __future__ import annotations

import pytest
import torch

import layerwise
from layerwise.api import check_donor, transfer_schedule, transfer_weights
from layerwise.bundle import Model
from layerwise.errors import InputError
from layerwise.training.loop import TrainConfig, group_learning_rate, make_optimizer, stage_depths


def convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return layerwise.create_model("convnet_s", in_channels=1, num_classes=3)


def test_without_transfer_the_optimizer_has_the_two_usual_groups() -> None:
    groups = make_optimizer(convnet(), TrainConfig()).param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(g["lr_scale"] == 1.0 and not g["backbone"] for g in groups)


def test_layer_decay_lowers_the_rate_stage_by_stage_away_from_the_head() -> None:
    model = convnet()
    depths = stage_depths(model)
    n_stages = len(model.named_stages())
    assert sorted(set(depths.values())) == list(range(1, n_stages + 1))
    assert not any(name.startswith("head") for name in depths)  # the head learns at the full rate
    optimizer = make_optimizer(model, TrainConfig(layer_decay=0.5))
    scale_of = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        assert scale_of[id(param)] == pytest.approx(0.5 ** depths.get(name, 0)), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_the_backbone_is_frozen_then_warms_up_again() -> None:
    config = TrainConfig(freeze_fraction=0.2, warmup_fraction=0.1, layer_decay=0.5)
    backbone = {"lr_scale": 0.25, "backbone": True}
    head = {"lr_scale": 1.0, "backbone": False}
    assert group_learning_rate(config, backbone, 1.0, 0.1) == 0.0
    assert group_learning_rate(config, head, 1.0, 0.1) == 1.0
    assert group_learning_rate(config, backbone, 1.0, 0.25) == pytest.approx(0.125)  # half-way through re-warmup
    assert group_learning_rate(config, backbone, 1.0, 0.5) == pytest.approx(0.25)


def trained_parameters(freeze_fraction: float) -> set[str]:
    """Names of the parameters that one short real training run changed."""
    from layerwise.data.batches import TensorBatches
    from layerwise.training.loop import train

    model = convnet()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 28, 28, generator=generator)
    labels = (images[:, :, :14].mean(dim=(1, 2, 3)) > images[:, :, 14:].mean(dim=(1, 2, 3))).long()
    batches = TensorBatches(images, labels, 16, lambda x: x, shuffle=True, seed=0)
    config = TrainConfig(epochs=1, batch_size=16, warmup_fraction=0.0, freeze_fraction=freeze_fraction)
    train(model, batches, batches, config, show_progress=False, log=lambda _: None)
    assert all(p.requires_grad for p in model.parameters())  # thawed again whatever the schedule
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}


def test_a_frozen_backbone_does_not_move_while_the_head_learns() -> None:
    moved = trained_parameters(freeze_fraction=0.9)  # all 4 steps fall inside the frozen 90%
    assert moved and all(name.startswith("head") for name in moved)
    moved = trained_parameters(freeze_fraction=0.3)  # thawed for the last two steps
    assert any(name.startswith("stages") for name in moved)


def test_the_schedule_defaults_with_init_and_is_kept_on_resume() -> None:
    assert transfer_schedule(None, False, None, None) == {"freeze_fraction": 0.0, "layer_decay": 1.0}
    chosen = transfer_schedule(None, True, None, None)
    assert chosen["freeze_fraction"] > 0 and chosen["layer_decay"] < 1
    assert transfer_schedule(None, True, 0.0, 0.9) == {"freeze_fraction": 0.0, "layer_decay": 0.9}
    saved = {"train": {"freeze_fraction": 0.3, "layer_decay": 0.6}}
    assert transfer_schedule(saved, False, None, None) == {"freeze_fraction": 0.3, "layer_decay": 0.6}
    assert transfer_schedule({"train": {}}, False, None, None) == {}  # a run from before the schedule existed


def test_an_image_classifier_backbone_starts_a_detector(fashion_run) -> None:
    donor_network = layerwise.create_model("resnet_s", in_channels=3, num_classes=5)
    donor = Model(donor_network, layerwise.load(fashion_run).task, {"model": {"name": "resnet_s", "config": {}}})
    detector = layerwise.create_model("fcos_resnet_s", num_classes=2, side=128)
    transfer_weights(detector, donor, donor.task, fashion_run)
    own = detector.state_dict()
    stage_tensors = [k for k in donor_network.state_dict() if k.startswith("stages.")]
    assert stage_tensors
    for name in stage_tensors:
        assert torch.equal(own["fcos.backbone." + name], donor_network.state_dict()[name]), name
    from layerwise.tasks import task_class

    check_donor(donor, task_class("detect"), fashion_run)  # classify -> detect is allowed


def test_no_fitting_tensor_names_the_shapes_that_differ(fashion_run) -> None:
    donor = layerwise.load(fashion_run)
    other = layerwise.create_model(
        donor.config["model"]["name"], **{**donor.config["model"]["config"], "in_channels": 3}
    )
    # Only some tensors differ here; a network whose every shared tensor differs is refused with the shapes.
    wide = layerwise.create_model("convnet_m", in_channels=3, num_classes=7)
    with pytest.raises(InputError, match=r"shapes differ: .*\(.*\) there, \(.*\) here"):
        transfer_weights(wide, donor, donor.task, fashion_run)
    fresh = transfer_weights(other, donor, donor.task, fashion_run)  # the rest of the stages still transfer
    # The stem takes 3 channels here, 1 there: it starts from random values, so the schedule neither freezes
    # it nor slows it down, while the transferred stages are frozen first.
    (stem,) = fresh
    params = dict(other.named_parameters())
    config = TrainConfig(freeze_fraction=0.1, layer_decay=0.75, fresh_parameters=fresh)
    group_of = {id(p): g for g in make_optimizer(other, config).param_groups for p in g["params"]}
    assert not group_of[id(params[stem])]["backbone"] and group_of[id(params[stem])]["lr_scale"] == 1.0
    transferred = next(name for name in params if name.startswith("stages.") and name not in fresh)
    assert group_of[id(params[transferred])]["backbone"]


def test_init_from_another_modality_or_an_unrelated_task_is_refused(cli, fortunes_run, fashion_train, tmp_path) -> None:
    code, _, err = cli("train", fashion_train, "--out", tmp_path / "r", "--init", fortunes_run, "--no-progress")
    assert code == 2
    assert "learned from text" in err and "image" in err
    assert not (tmp_path / "r" / "model.safetensors").exists()
    donor = layerwise.load(fortunes_run)
    from layerwise.tasks import task_class

    with pytest.raises(InputError, match="cannot start a fold run"):
        check_donor(donor, task_class("fold"), fortunes_run)


def test_the_verdict_names_the_approach_that_won() -> None:
    from layerwise.baseline import verdict

    assert "deep model (pretrained without labels in p, then fine-tuned) beats" in verdict(
        0.9, 0.8, approach="pretrained without labels in p, then fine-tuned"
    )
    assert verdict(0.7, 0.8).startswith("The classical baseline wins") and "(from scratch)" in verdict(0.7, 0.8)


def test_a_stem_left_out_of_the_stages_counts_as_the_earliest_layer() -> None:
    model = layerwise.create_model("timm:resnet18", in_channels=3, num_classes=2)  # timm's stages start at layer1
    depths = stage_depths(model)
    assert depths["body.conv1.weight"] == max(depths.values()) == len(model.named_stages()) + 1
    assert "body.fc.weight" not in depths
