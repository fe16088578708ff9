"""`layerwise export` of a transcribe run: the audio encoder and the text decoder as two ONNX graphs, and the
greedy loop of the spec's "decoding" run with numpy and onnxruntime alone."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from layerwise.data.speech_demo import prepare_speech_demo

# A few clips and one epoch: only the export's parity with PyTorch is tested, not what the model learnt.
TRAIN_ARGS = ["--task", "transcribe", "--epochs", "1", "--batch-size", "8", "--checkpoint-every", "0", "--no-progress"]
DECODER_WEIGHT_STD, EOT_BIAS = 0.15, 1.2  # see `decoder_run`
N_FFT, HOP_LENGTH, LOG_MEL_RANGE = 400, 160, 8.0  # as the spec's "decoding" states them


@pytest.fixture(scope="module")
def speech_demo(tmp_path_factory):
    return prepare_speech_demo(tmp_path_factory.mktemp("speech"), clips_per_language=4)


def train(manifest: Path, run: Path, model: str) -> Path:
    from typer.testing import CliRunner

    from layerwise.cli import app

    result = CliRunner().invoke(app, ["train", str(manifest), "--out", str(run), "--model", model, *TRAIN_ARGS])
    assert result.exit_code == 0, result.stderr
    return run


@pytest.fixture(scope="module")
def decoder_run(speech_demo, tmp_path_factory) -> Path:
    import torch

    import layerwise

    run = train(speech_demo.train_manifest, tmp_path_factory.mktemp("runs") / "asr", "speech_xs_decoder")
    # One epoch leaves the decoder repeating one character whatever it hears, which a wrong loop would reproduce
    # too. Random matrices of this scale make every step's choice depend on the audio, the language token and
    # the prefix, and a final bias towards eot's embedding ends some texts before max_text_tokens: the numpy
    # loop matches layerwise only if it is the same loop.
    bundle = layerwise.load(run)
    decoder = bundle.network.decoder
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in decoder.parameters():
            if weight.ndim == 2:
                weight.normal_(0, DECODER_WEIGHT_STD)
        decoder.norm.bias += EOT_BIAS * decoder.embed.weight[bundle.network.eot]
    bundle.save(run)
    return run


def numpy_log_mel(wave: np.ndarray, n_mels: int, sample_rate: int) -> np.ndarray:
    """The spec's feature recipe in numpy: (n,) samples -> float32 (n_mels, n // hop + 1)."""
    padded = np.pad(wave.astype(np.float64), N_FFT // 2)  # centred frames, zeros beyond the ends
    n_frames = len(wave) // HOP_LENGTH + 1
    frames = np.stack([padded[i * HOP_LENGTH : i * HOP_LENGTH + N_FFT] for i in range(n_frames)])  # (T, n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window)) ** 2  # (T, n_fft // 2 + 1)
    mel = lambda hz: 2595 * np.log10(1 + hz / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(0, mel(sample_rate / 2), n_mels + 2) / 2595) - 1)  # HTK, in Hz
    hz = np.fft.rfftfreq(N_FFT, 1 / sample_rate)
    rising = (hz - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    falling = (edges[2:, None] - hz) / (edges[2:, None] - edges[1:-1, None])
    filters = np.maximum(0, np.minimum(rising, falling))  # (n_mels, n_fft // 2 + 1)
    log = np.log10(np.maximum(filters @ power.T, 1e-10))  # (n_mels, T)
    return ((np.maximum(log, log.max() - LOG_MEL_RANGE) + 4) / 4).astype(np.float32)


def numpy_only_transcribe(model_file: Path, wave: np.ndarray) -> str:
    """Greedy decoding as the spec's "decoding" describes it, with numpy and onnxruntime only."""
    import onnxruntime

    spec = json.loads(model_file.with_name(model_file.name + ".json").read_text())
    prep = spec["preprocessing"]
    characters, languages = prep["alphabet"]["characters"], prep["alphabet"]["languages"]
    vocab = len(characters) + 1  # id 0 is the CTC blank
    sot, eot, transcribe = vocab, vocab + 1, vocab + 2
    encoder, decoder = (
        onnxruntime.InferenceSession(str(model_file.with_name(graph["file"])), providers=["CPUExecutionProvider"])
        for graph in spec["graphs"]
    )
    features = numpy_log_mel(wave, prep["n_mels"], prep["sample_rate"])[None]  # (1, n_mels, T)
    lengths = np.array([features.shape[2]], dtype=np.int64)
    encoded, enc_lengths, language_logits = encoder.run(None, {"features": features, "lengths": lengths})
    tokens = [sot, vocab + 3 + int(language_logits[0].argmax()), transcribe]
    allowed = np.zeros(vocab + 3 + len(languages), dtype=bool)
    allowed[1:vocab] = allowed[eot] = True  # characters and eot; never the blank or a prompt token
    for _ in range(spec["model"]["config"]["max_text_tokens"]):
        inputs = {"tokens": np.array([tokens], dtype=np.int64), "encoded": encoded, "enc_lengths": enc_lengths}
        logits = decoder.run(None, inputs)[0][0, -1]  # (decoder vocab,): the last position's
        next_id = int(np.where(allowed, logits, -np.inf).argmax())
        if next_id == eot:
            break
        tokens.append(next_id)
    return "".join(characters[i - 1] for i in tokens[3:]).strip()


def test_a_transcribe_run_exports_encoder_and_decoder_and_decodes_without_layerwise(
    cli, decoder_run, speech_demo, tmp_path
) -> None:
    import layerwise
    from layerwise.data.speech import load_speech, log_mel_batch, speech_segments

    out = tmp_path / "asr.onnx"
    code, stdout, err = cli("export", decoder_run, "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["max_abs_difference"] <= 1e-4
    spec = json.loads((tmp_path / "asr.onnx.json").read_text())
    assert [g["file"] for g in spec["graphs"]] == ["asr.onnx", "asr.decoder.onnx"]
    assert out.exists() and (tmp_path / "asr.decoder.onnx").exists() and "eot" in spec["decoding"]
    assert spec["graphs"][1]["inputs"][0]["shape"] == ["batch", "tokens"]

    bundle = layerwise.load(decoder_run)
    with speech_demo.train_manifest.open(newline="", encoding="utf-8") as file:
        clips = [speech_demo.train_manifest.parent / row["path"] for row in csv.DictReader(file)][:3]
    results, problems = bundle.predict(clips, beam_size=1)
    assert not problems and len({r.text for r in results}) == 3  # the greedy path differs from clip to clip
    for clip, result in zip(clips, results, strict=True):
        wave = load_speech(clip)
        (start, end), *more = speech_segments(wave, bundle.task.max_seconds)  # what `transcribe` cuts
        assert not more, "a short clip is one chunk"
        chunk = wave[start:end]
        features = numpy_log_mel(chunk, 80, 16_000)  # the recipe is the front end's
        assert np.abs(features - log_mel_batch([chunk], 80)[0][0].numpy()).max() < 1e-3
        assert numpy_only_transcribe(out, chunk) == result.text


def test_a_ctc_only_run_exports_the_encoder_with_ctc_log_probs(cli, speech_demo, tmp_path) -> None:
    import onnxruntime
    import torch

    import layerwise
    from layerwise.data.speech import load_speech, speech_segments

    run = train(speech_demo.train_manifest, tmp_path / "ctc", "speech_xs")
    bundle = layerwise.load(run)
    torch.manual_seed(0)
    with torch.no_grad():  # one epoch emits only blanks: random head weights give each clip its own best path
        bundle.network.ctc_head.weight.normal_(0, 0.5)
    bundle.save(run)
    out = tmp_path / "ctc.onnx"
    code, stdout, err = cli("export", run, "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["max_abs_difference"] <= 1e-4
    spec = json.loads((tmp_path / "ctc.onnx.json").read_text())
    assert len(spec["graphs"]) == 1 and spec["graphs"][0]["outputs"][-1] == "ctc_log_probs"

    with speech_demo.train_manifest.open(newline="", encoding="utf-8") as file:
        clip = speech_demo.train_manifest.parent / next(csv.DictReader(file))["path"]
    wave = load_speech(clip)
    (start, end), *_ = speech_segments(wave, bundle.task.max_seconds)
    features = numpy_log_mel(wave[start:end], 80, 16_000)[None]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    lengths = np.array([features.shape[2]], dtype=np.int64)
    _, enc_lengths, _, ctc_log_probs = session.run(None, {"features": features, "lengths": lengths})
    path = ctc_log_probs[0, : enc_lengths[0]].argmax(axis=-1)  # best path: merge runs, then drop blanks
    ids = [int(i) for j, i in enumerate(path) if i != 0 and (j == 0 or i != path[j - 1])]
    text = "".join(spec["preprocessing"]["alphabet"]["characters"][i - 1] for i in ids).strip()
    results, _ = bundle.predict([clip], beam_size=1)
    assert text and text == results[0].text
