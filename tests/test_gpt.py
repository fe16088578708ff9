"""The GPT language model: shapes, gradients, causality, the KV cache, sampling, and memorising a sentence."""

import pytest
import torch

from layerwise.errors import InputError
from layerwise.models import create_model, list_models
from layerwise.models.gpt import GPT, GPTConfig, filter_logits, generate

VOCAB = 50


def tiny_gpt(context_len: int = 16, vocab_size: int = VOCAB, dim: int = 32, depth: int = 2) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size, context_len, dim=dim, depth=depth, heads=4)).eval()


def test_every_parameter_gets_a_finite_gradient_and_forward_is_features_then_head() -> None:
    model = tiny_gpt().train()
    ids = torch.randint(0, VOCAB, (3, 10))
    logits = model(ids)
    assert logits.shape == (3, 10, VOCAB)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"

    model.eval()
    features = model.forward_features(ids)
    assert features.shape == (3, 10, model.num_features)
    torch.testing.assert_close(model.forward_head(features), model(ids))
    assert model.forward_head(features, pre_logits=True).shape == (3, model.num_features)
    assert [name for name, _ in model.named_stages()] == ["embed", "block1", "block2"]


def test_output_embedding_is_tied_to_the_input_embedding() -> None:
    model = tiny_gpt()
    assert model.head.weight is model.embed.weight
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()
    assert sum(p is model.embed.weight for p in model.parameters()) == 1


def test_residual_projections_start_smaller_as_in_gpt2() -> None:
    model = tiny_gpt(dim=64, depth=8)
    qkv_std = torch.stack([b.attn.qkv.weight.std() for b in model.blocks]).mean()
    proj_std = torch.stack([b.attn.proj.weight.std() for b in model.blocks]).mean()
    torch.testing.assert_close(qkv_std, torch.tensor(0.02), atol=1e-3, rtol=0)
    torch.testing.assert_close(proj_std, torch.tensor(0.02 / 4.0), atol=5e-4, rtol=0)  # 0.02 / sqrt(2 * 8)


def test_a_later_token_does_not_change_earlier_logits() -> None:
    model = tiny_gpt()
    ids = torch.randint(0, VOCAB, (2, 12))
    changed = ids.clone()
    changed[:, 7] = (ids[:, 7] + 1) % VOCAB
    before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_cached_chunks_and_steps_give_the_full_forward_logits() -> None:
    model = tiny_gpt(context_len=16)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(ids)
        first, cache = model.forward_step(ids[:, :5])  # a prompt chunk, no cache yet
        second, cache = model.forward_step(ids[:, 5:8], cache)  # several queries after cached keys
        steps = []
        for t in range(8, 12):
            logits, cache = model.forward_step(ids[:, t : t + 1], cache)
            steps.append(logits)
    assert len(cache) == 2 and cache[0][0].shape == (2, 4, 12, 8)  # (B, H, L, head_dim)
    torch.testing.assert_close(torch.cat([first, second, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="exceed context_len"):
        model.forward_step(ids[:, :5], cache)


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=10, top_p=0.9)],
    ids=["greedy", "sample", "top_k_top_p"],
)
def test_cached_generation_equals_uncached_even_past_the_context(sampling: dict) -> None:
    model = tiny_gpt(context_len=8)
    prompt = [3, 14, 15, 9]
    runs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(1)
        runs.append(generate(model, prompt, 20, generator=generator, use_cache=use_cache, **sampling))
    assert len(runs[0]) == 20  # 4 + 20 tokens: the window slides 16 times
    assert runs[0] == runs[1]


def test_generate_truncates_the_prompt_streams_tokens_and_restores_training_mode() -> None:
    model = tiny_gpt(context_len=8).train()
    long_prompt = list(range(1, 13))
    streamed: list[int] = []
    out = generate(model, long_prompt, 6, temperature=0.0, on_token=streamed.append)
    assert model.training
    assert streamed == out
    assert out == generate(model, long_prompt[-8:], 6, temperature=0.0)
    assert generate(model, [1], 0) == []
    with pytest.raises(InputError, match="empty"):
        generate(model, [], 3)
    with pytest.raises(InputError, match="top_p"):
        generate(model, [1], 3, top_p=0.0)


def test_temperature_zero_ignores_the_generator_and_top_k_1_or_tiny_top_p_is_greedy() -> None:
    model = tiny_gpt()
    prompt = [5, 6, 7]
    greedy = generate(model, prompt, 10, temperature=0.0, generator=torch.Generator().manual_seed(0))
    assert greedy == generate(model, prompt, 10, temperature=0.0, generator=torch.Generator().manual_seed(99))
    assert greedy == generate(model, prompt, 10, top_k=1, generator=torch.Generator().manual_seed(3))
    assert greedy == generate(model, prompt, 10, top_p=1e-6, generator=torch.Generator().manual_seed(4))
    sampled = [generate(model, prompt, 10, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_filter_logits_keeps_the_top_k_and_the_nucleus() -> None:
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    logits = probs.log()
    kept = lambda filtered: torch.isfinite(filtered).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [1, 3]
    assert kept(filter_logits(logits, top_p=0.5)) == [1]  # 0.5 alone reaches 0.5
    assert kept(filter_logits(logits, top_p=0.75)) == [1, 3]  # 0.5 + 0.3 >= 0.75
    assert kept(filter_logits(logits, top_p=0.85)) == [1, 2, 3]
    assert kept(filter_logits(logits, top_k=2, top_p=0.99)) == [1, 3]
    torch.testing.assert_close(filter_logits(logits[None], top_k=5, top_p=1.0), logits[None])


def test_a_tiny_gpt_memorises_a_sentence_longer_than_its_context() -> None:
    text = b"the quick brown fox jumps over a lazy dog"  # 41 bytes, as tokens
    context_len = 16
    ids = torch.tensor(list(text))
    windows = ids.unfold(0, context_len + 1, 1)  # (25, 17): every window of the text, plus its next token
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, context_len=context_len, dim=64, depth=2, heads=4))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):  # it has the text by step ~50
        logits = model(windows[:, :-1])  # (25, 16, 256)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    prompt = list(text[:4])
    # 4 + 37 tokens: the window slides 25 times, so this also checks the cache across a sliding window
    for use_cache in (True, False):
        assert bytes(generate(model, prompt, len(text) - 4, temperature=0.0, use_cache=use_cache)) == text[4:]


def test_registered_gpts_build_with_the_documented_sizes() -> None:
    assert {"gpt_tiny", "gpt_small", "gpt_medium"} <= set(list_models(task="generate"))
    assert "gpt_tiny" not in list_models(task="classify")
    model = create_model("gpt_tiny", vocab_size=VOCAB, context_len=16)
    assert isinstance(model, GPT)
    assert (model.num_features, len(model.blocks), model.blocks[0].attn.heads) == (128, 4, 4)
    assert model.context_len == 16
    assert model(torch.randint(0, VOCAB, (1, 16))).shape == (1, 16, VOCAB)
