"""Early stopping waits for both `patience` epochs and `patience_min_steps` optimizer steps without progress."""

from __future__ import annotations

import torch
from torch import nn

from layerwise.data.batches import TensorBatches
from layerwise.training.loop import LoopState, TrainConfig, train


def fit_a_model_that_cannot_improve(patience_min_steps: int):
    """4 steps an epoch at a learning rate too small to change a prediction: every epoch after the first is bad."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(80, 8, generator=generator)
    labels = (inputs[:, 0] > 0).long()
    train_batches = TensorBatches(inputs[:64], labels[:64], 16, lambda x: x, shuffle=True, seed=0)
    val_batches = TensorBatches(inputs[64:], labels[64:], 16, lambda x: x)
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    config = TrainConfig(epochs=30, batch_size=16, lr=1e-12, patience=2, patience_min_steps=patience_min_steps,
                         device="cpu", precision="fp32")  # fmt: skip
    return train(model, train_batches, val_batches, config, show_progress=False, log=lambda message: None)


def test_patience_in_epochs_alone_stops_after_the_patience_epochs():
    result = fit_a_model_that_cannot_improve(patience_min_steps=0)
    assert result.best_epoch == 1 and len(result.history) == 3
    assert "early stopping" in result.stop_reason


def test_an_epoch_of_few_steps_does_not_stop_training_before_the_minimum_steps():
    # Best at epoch 1 (step 4); 20 more steps are 5 more epochs of 4 steps.
    result = fit_a_model_that_cannot_improve(patience_min_steps=20)
    assert result.best_epoch == 1 and len(result.history) == 6
    assert result.stop_reason.endswith("for 5 epochs (20 steps)")


def test_a_checkpoint_from_before_best_step_takes_it_from_the_history():
    saved = {"epoch": 3, "global_step": 12, "best_epoch": 2, "history": [{"step": 4}, {"step": 8}, {"step": 12}]}
    assert LoopState.from_json(saved).best_step == 8
    assert LoopState.from_json({**saved, "best_step": 5}).best_step == 5
