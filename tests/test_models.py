"""Every registered model: forward, backward, a gradient for every parameter, no NaN; the shared surface."""

import pytest
import torch

from layerwise.models import create_model, list_models
from layerwise.models.registry import model_entry

NUM_CLASSES = 5


def example_input(name: str) -> tuple[torch.Tensor, dict]:
    if "text" in model_entry(name).modalities:
        ids = torch.randint(4, 50, (3, 12))
        ids[0, 8:] = 0  # padding
        return ids, {"vocab_size": 50, "max_len": 12}
    return torch.randn(3, 1, 28, 28), {"in_channels": 1}


@pytest.mark.parametrize("name", list_models(task="classify"))
def test_forward_backward_reaches_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    x, inputs = example_input(name)
    model = create_model(name, num_classes=NUM_CLASSES, **inputs)
    logits = model(x)
    assert logits.shape == (3, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {pname} has a non-finite gradient"
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters())


@pytest.mark.parametrize("name", list_models(task="classify"))
def test_forward_is_features_then_head(name: str) -> None:
    torch.manual_seed(0)
    x, inputs = example_input(name)
    model = create_model(name, num_classes=NUM_CLASSES, **inputs).eval()
    features = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(features), model(x))
    embedding = model.forward_head(features, pre_logits=True)
    assert embedding.shape == (3, model.num_features)
    stages = model.named_stages()
    assert len(stages) >= 3 and len({n for n, _ in stages}) == len(stages)


def test_resnet_stem_stride_shrinks_the_feature_map() -> None:
    x = torch.randn(2, 3, 96, 96)
    small = create_model("resnet_s", in_channels=3, num_classes=2, stem_stride=1).eval()
    large = create_model("resnet_s", in_channels=3, num_classes=2, stem_stride=2).eval()
    assert small.forward_features(x).shape[-1] == 4 * large.forward_features(x).shape[-1]


def test_transformer_ignores_padding() -> None:
    torch.manual_seed(0)
    model = create_model("transformer_tiny", vocab_size=50, max_len=16, num_classes=2).eval()
    short = torch.tensor([[2, 10, 11, 12] + [0] * 12])
    other_padding_length = torch.tensor([[2, 10, 11, 12] + [0] * 4])
    torch.testing.assert_close(model(short), model(other_padding_length), atol=1e-5, rtol=1e-5)


def test_unknown_model_names_the_known_ones() -> None:
    from layerwise.errors import InputError

    with pytest.raises(InputError, match="unknown model 'nope'.*convnet_s"):
        create_model("nope")
