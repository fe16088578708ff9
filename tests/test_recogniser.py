"""The speech recogniser: stem lengths, shapes, padding invariance, gradients, CTC prefix beam search against brute
force, and CTC-only and hybrid CTC/decoder models learning to transcribe synthetic "speech" exactly."""

import itertools
import math

import pytest
import torch
from torchmetrics.text import CharErrorRate

from layerwise.errors import InputError
from layerwise.models.recogniser import (
    RECOGNISER_SIZES,
    ConvStem,
    DecodingOptions,
    RecogniserConfig,
    SpeechRecogniser,
    beam_search,
    build_recogniser,
    ctc_prefix_beam_search,
    downsampled_lengths,
    greedy_search,
    transcribe,
)

N_MELS = 16
ALPHABET = "abcdef"  # character id i + 1 is ALPHABET[i]; id 0 is the blank
VOCAB = len(ALPHABET) + 1
N_LANGUAGES = 3
UNLABELLED = [3, 7, 11]  # clips trained without their language: the decoder is prompted with the model's guess
LABELLED = [i for i in range(12) if i not in UNLABELLED]


def tiny(n_languages: int = N_LANGUAGES, decoder_depth: int = 0, dim: int = 48, depth: int = 2) -> SpeechRecogniser:
    torch.manual_seed(0)
    config = RecogniserConfig(
        N_MELS,
        VOCAB,
        n_languages,
        dim=dim,
        depth=depth,
        heads=4,
        decoder_depth=decoder_depth,
        dropout=0.0,
        max_frames=64,
        max_text_tokens=12,
    )
    return SpeechRecogniser(config)


def synthetic_speech(n_clips: int = 12, seed: int = 0):
    """Each character is a fixed random spectrum held for 6-10 frames, with 4-6 frames of silence around each;
    each language adds its own fixed tint to every frame. -> features (N, n_mels, T) zero-padded, lengths (N,),
    targets (N, S) padded with 0, target_lengths (N,), languages (N,), texts."""
    gen = torch.Generator().manual_seed(seed)
    spectra = 2.0 * torch.randn(len(ALPHABET), N_MELS, generator=gen)  # (chars, n_mels)
    tints = 1.5 * torch.randn(N_LANGUAGES, N_MELS, generator=gen)
    silence = lambda: torch.zeros(int(torch.randint(4, 7, (1,), generator=gen)), N_MELS)  # noqa: E731
    clips, texts, languages = [], [], []
    for i in range(n_clips):
        ids = torch.randint(1, VOCAB, (int(torch.randint(3, 6, (1,), generator=gen)),), generator=gen).tolist()
        if i == 0:
            ids[1] = ids[0]  # a doubled character: CTC must put a blank between the two
        frames = [silence()]
        for char in ids:
            frames += [spectra[char - 1].repeat(int(torch.randint(6, 11, (1,), generator=gen)), 1), silence()]
        language = i % N_LANGUAGES
        clip = torch.cat(frames) + tints[language]
        clips.append(clip + 0.1 * torch.randn(clip.shape, generator=gen))  # (T_i, n_mels)
        texts.append(ids)
        languages.append(language)
    lengths = torch.tensor([len(c) for c in clips])
    features = torch.zeros(n_clips, N_MELS, int(lengths.max()))
    for i, clip in enumerate(clips):
        features[i, :, : len(clip)] = clip.T
    target_lengths = torch.tensor([len(t) for t in texts])
    targets = torch.zeros(n_clips, int(target_lengths.max()), dtype=torch.long)
    for i, text in enumerate(texts):
        targets[i, : len(text)] = torch.tensor(text)
    return features, lengths, targets, target_lengths, torch.tensor(languages), texts


def as_text(ids: list[int]) -> str:
    return "".join(ALPHABET[i - 1] for i in ids)


def cer(model: SpeechRecogniser, data, options: DecodingOptions | None = None) -> float:
    features, lengths, *_, texts = data
    hyps = transcribe(model, features, lengths, options)
    return CharErrorRate()([as_text(h.tokens) for h in hyps], [as_text(t) for t in texts]).item()


def languages_right(model: SpeechRecogniser, data) -> bool:
    detected = [h.language for h in transcribe(model, data[0], data[1])]
    return [detected[i] for i in LABELLED] == data[4][LABELLED].tolist()


def train_until_exact(model: SpeechRecogniser, data, max_steps: int = 300, lr: float = 3e-3) -> int:
    """Full-batch Adam until greedy CER is 0 on all clips and the trained-on languages are right; returns the steps.
    A step budget rather than a clock, so a busy machine cannot fail it: ~0.02 s a step on 2 cores, 30-50 needed."""
    features, lengths, targets, target_lengths, languages, _ = data
    languages = languages.clone()
    languages[UNLABELLED] = -1
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(1, max_steps + 1):
        model.train()
        loss, stats = model.loss(features, lengths, targets, target_lengths, languages)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert math.isfinite(stats["loss"])
        if step % 10 == 0 and cer(model, data) == 0.0 and languages_right(model, data):
            return step
    raise AssertionError(f"CER {cer(model, data):.3f} after {max_steps} steps")


@pytest.fixture(autouse=True)
def _one_thread(_torch_threads):
    """Overrides conftest's thread count: on tensors this small a second OpenMP thread mostly spins, and on a busy
    machine training took 30-100x longer with it (0.5 s against 15-65 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return synthetic_speech()


@pytest.fixture(scope="module")
def ctc_model(data) -> SpeechRecogniser:
    torch.set_num_threads(1)  # module-scoped: set up before _one_thread runs
    model = tiny()
    train_until_exact(model, data)
    return model.eval()


@pytest.fixture(scope="module")
def hybrid_model(data) -> SpeechRecogniser:
    torch.set_num_threads(1)
    model = tiny(decoder_depth=1)
    train_until_exact(model, data)
    return model.eval()


def test_downsampled_lengths_match_the_conv_stem() -> None:
    stem = ConvStem(N_MELS, 8)
    for length in range(1, 20):
        out, out_lengths = stem(torch.randn(1, N_MELS, length), torch.tensor([length]))
        assert out.shape[1] == out_lengths.item() == downsampled_lengths(torch.tensor(length)).item()
    assert downsampled_lengths(torch.tensor([1, 4, 5, 8, 9, 100])).tolist() == [1, 1, 2, 2, 3, 25]


@pytest.mark.parametrize("decoder_depth,n_languages", [(0, N_LANGUAGES), (0, 0), (1, N_LANGUAGES), (1, 0)])
def test_shapes_and_lengths(decoder_depth: int, n_languages: int) -> None:
    model = tiny(n_languages, decoder_depth).eval()
    features, lengths = torch.randn(3, N_MELS, 41), torch.tensor([41, 30, 9])
    out = model(features, lengths)
    assert out["ctc_log_probs"].shape == (3, 11, VOCAB)
    assert out["lengths"].tolist() == [11, 8, 3]
    torch.testing.assert_close(out["ctc_log_probs"].exp().sum(-1), torch.ones(3, 11))
    assert ("language_logits" in out) == bool(n_languages)
    if n_languages:
        assert out["language_logits"].shape == (3, n_languages)
    encoded, enc_lengths = model.forward_features(features, lengths)
    assert encoded.shape == (3, 11, model.num_features) and (encoded[2, 3:] == 0).all()

    assert (model.sot, model.eot, model.transcribe_token) == (VOCAB, VOCAB + 1, VOCAB + 2)
    assert model.decoder_vocab_size == VOCAB + 3 + n_languages
    prompts = model.prompts(torch.tensor([2, 0]) if n_languages else None)
    with_languages = [[VOCAB, VOCAB + 3 + 2, VOCAB + 2], [VOCAB, VOCAB + 3, VOCAB + 2]]
    expected = with_languages if n_languages else [[VOCAB, VOCAB + 2]]
    assert prompts.tolist() == expected
    if decoder_depth:
        tokens = torch.randint(0, model.decoder_vocab_size, (3, 5))
        assert model.decode(tokens, encoded, enc_lengths).shape == (3, 5, model.decoder_vocab_size)
    else:
        with pytest.raises(InputError, match="no decoder"):
            model.decode(torch.zeros(3, 2, dtype=torch.long), encoded, enc_lengths)
    with pytest.raises(InputError, match="n_mels=16"):
        model(torch.randn(1, 8, 20), torch.tensor([20]))
    with pytest.raises(InputError, match="max_frames"):
        model(torch.randn(1, N_MELS, 4 * 64 + 1), torch.tensor([4 * 64 + 1]))


@pytest.mark.parametrize("decoder_depth", [0, 1])
def test_a_clip_gives_the_same_outputs_alone_and_batched_with_a_longer_one(decoder_depth: int) -> None:
    model = tiny(decoder_depth=decoder_depth).eval()
    torch.manual_seed(1)
    short, long = torch.randn(1, N_MELS, 23), torch.randn(1, N_MELS, 57)
    batch = torch.zeros(2, N_MELS, 57)
    batch[0, :, :23], batch[1] = short[0], long[0]
    batch[0, :, 23:] = 5.0  # whatever the padding holds must not matter
    lengths = torch.tensor([23, 57])
    alone, together = model(short, torch.tensor([23])), model(batch, lengths)
    frames = alone["lengths"].item()
    torch.testing.assert_close(together["ctc_log_probs"][0, :frames], alone["ctc_log_probs"][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(together["language_logits"][0], alone["language_logits"][0], atol=1e-4, rtol=0)
    if decoder_depth:
        tokens = torch.randint(1, VOCAB, (2, 6))
        alone_logits = model.decode(tokens[:1], *model.forward_features(short, torch.tensor([23])))
        together_logits = model.decode(tokens, *model.forward_features(batch, lengths))
        torch.testing.assert_close(together_logits[0], alone_logits[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("decoder_depth", [0, 1])
def test_every_parameter_gets_a_finite_gradient(decoder_depth: int) -> None:
    model = tiny(decoder_depth=decoder_depth).train()
    features, lengths, targets, target_lengths, languages, _ = synthetic_speech(n_clips=4)
    languages[1] = -1
    loss, stats = model.loss(features, lengths, targets, target_lengths, languages)
    loss.backward()
    assert set(stats) == {"ctc", "language", "decoder", "loss"}
    assert (stats["decoder"] > 0) == bool(decoder_depth) and stats["ctc"] > 0 and stats["language"] > 0
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def brute_force_labelling_log_probs(log_probs: torch.Tensor) -> dict[tuple[int, ...], float]:
    """Sum the probability of every frame path (V^T of them) into the labelling it collapses to."""
    probs = log_probs.double().exp()
    totals: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(probs.shape[1]), repeat=probs.shape[0]):
        labelling = tuple(k for k, _ in itertools.groupby(path) if k != 0)
        totals[labelling] = totals.get(labelling, 0.0) + math.prod(probs[t, k].item() for t, k in enumerate(path))
    return {labelling: math.log(p) for labelling, p in totals.items()}


def test_prefix_beam_search_merges_paths_so_a_labelling_beats_the_best_path() -> None:
    # Two frames, blank 0.6 and "a" 0.4 each: the best path is blank-blank (0.36, the empty labelling), but "a"
    # collects a-a, a-blank and blank-a: 0.16 + 0.24 + 0.24 = 0.64.
    log_probs = torch.tensor([[0.6, 0.4], [0.6, 0.4]]).log()
    best, runner_up = ctc_prefix_beam_search(log_probs, beam_size=2)
    assert best[0] == [1] and best[1] == pytest.approx(math.log(0.64))
    assert runner_up[0] == [] and runner_up[1] == pytest.approx(math.log(0.36))
    # A doubled character needs a blank between: "aa" is only a-blank-a.
    log_probs = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.1, 0.9]]).log()
    labellings = dict((tuple(t), p) for t, p in ctc_prefix_beam_search(log_probs, beam_size=10))
    assert labellings[(1, 1)] == pytest.approx(math.log(0.9 * 0.8 * 0.9))


def test_prefix_beam_search_with_a_wide_beam_is_exact() -> None:
    torch.manual_seed(0)
    log_probs = torch.randn(5, 3).mul(2).log_softmax(-1)  # 3^5 = 243 paths
    reference = brute_force_labelling_log_probs(log_probs)
    found = ctc_prefix_beam_search(log_probs, beam_size=len(reference))
    assert {tuple(t) for t, _ in found} == set(reference)
    for tokens, log_prob in found:
        assert log_prob == pytest.approx(reference[tuple(tokens)], abs=1e-9)
    ranked = sorted(reference, key=reference.get, reverse=True)
    narrow = ctc_prefix_beam_search(log_probs, beam_size=3)
    assert [tuple(t) for t, _ in narrow][0] == ranked[0]


def test_beam_search_finds_a_sequence_greedy_misses_and_beam_1_is_greedy() -> None:
    # A toy language model over {0: eot, 1, 2}: greedy takes 1 (0.6), after which every step is uncertain
    # (eot 0.3); 2 (0.4) is followed by eot with certainty. Best sequence: [2] (log 0.4 over 2 tokens).
    table = {(): [0.0, 0.6, 0.4], (2,): [1.0, 0.0, 0.0]}

    def step(tokens: torch.Tensor, clips: torch.Tensor) -> torch.Tensor:
        rows = [table.get(tuple(row[1:]), [0.3, 0.36, 0.34]) for row in tokens.tolist()]
        return torch.tensor(rows).log()

    prompts = torch.tensor([[9], [9]])
    greedy = greedy_search(step, prompts, eot=0, max_new_tokens=4)
    assert greedy[0] == ([1, 1, 1, 1], pytest.approx(math.log(0.6) + 3 * math.log(0.36) + math.log(0.3)))
    assert beam_search(step, prompts, eot=0, max_new_tokens=4, beam_size=1) == greedy
    best = beam_search(step, prompts, eot=0, max_new_tokens=4, beam_size=3)
    assert best[0][0] == [2] and best[0][1] == pytest.approx(math.log(0.4))
    assert best[0][1] / 2 > greedy[0][1] / (len(greedy[0][0]) + 1)
    forced = greedy_search(step, prompts, eot=0, max_new_tokens=1)  # out of room: eot is forced
    assert forced[0] == ([1], pytest.approx(math.log(0.6) + math.log(0.3)))


def test_ctc_model_learns_to_transcribe_exactly(ctc_model, data) -> None:
    assert cer(ctc_model, data) == 0.0
    assert cer(ctc_model, data, DecodingOptions(beam_size=4)) == 0.0
    features, lengths, *_ = data
    greedy = transcribe(ctc_model, features, lengths)
    beam = transcribe(ctc_model, features, lengths, DecodingOptions(beam_size=4))
    for g, b in zip(greedy, beam, strict=True):
        assert b.log_prob >= g.log_prob - 1e-6  # a labelling's probability includes its best path's
    assert languages_right(ctc_model, data)


def test_decoder_model_learns_to_transcribe_and_beam_search_agrees(hybrid_model, data) -> None:
    features, lengths, *_, texts = data
    greedy = transcribe(hybrid_model, features, lengths)
    assert [h.tokens for h in greedy] == texts
    assert languages_right(hybrid_model, data)
    beam_1 = transcribe(hybrid_model, features, lengths, DecodingOptions(beam_size=1))
    assert [h.tokens for h in beam_1] == [h.tokens for h in greedy]
    beam_4 = transcribe(hybrid_model, features, lengths, DecodingOptions(beam_size=4))
    for g, b in zip(greedy, beam_4, strict=True):
        assert b.log_prob / (len(b.tokens) + 1) >= g.log_prob / (len(g.tokens) + 1) - 1e-6


def test_forced_language_is_reported_with_its_own_confidence(hybrid_model, data) -> None:
    features, lengths, *_ = data
    probs = hybrid_model(features[:3], lengths[:3])["language_logits"].softmax(-1)
    detected = transcribe(hybrid_model, features[:3], lengths[:3])
    forced = transcribe(hybrid_model, features[:3], lengths[:3], DecodingOptions(language=2))
    assert [h.language for h in detected] == [0, 1, 2]
    assert [h.language for h in forced] == [2, 2, 2]
    for i, (d, f) in enumerate(zip(detected, forced, strict=True)):
        assert d.language_confidence == pytest.approx(probs[i].max().item(), abs=1e-6)
        assert f.language_confidence == pytest.approx(probs[i, 2].item(), abs=1e-6)
    assert forced[0].language_confidence < 0.5 < detected[0].language_confidence
    with pytest.raises(InputError, match="language 3"):
        transcribe(hybrid_model, features[:1], lengths[:1], DecodingOptions(language=3))


def test_builder_sizes_and_config_errors() -> None:
    model = build_recogniser("speech_xs", N_MELS, VOCAB, 2, decoder_depth=1, max_text_tokens=20)
    assert model.config.dim == RECOGNISER_SIZES["speech_xs"]["dim"] and model.decoder is not None
    assert model.decoder.context_len == 3 + 20
    with pytest.raises(InputError, match="unknown size"):
        build_recogniser("speech_xxl", N_MELS, VOCAB, 0, 0)
    with pytest.raises(InputError, match="multiple of heads"):
        RecogniserConfig(N_MELS, VOCAB, 0, dim=50, depth=1, heads=4)
    with pytest.raises(InputError, match="beam_size"):
        DecodingOptions(beam_size=0)
