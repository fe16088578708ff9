"""The transcribe task end to end on real synthesised speech (espeak-ng) in five languages."""

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from layerwise.data.speech_demo import prepare_speech_demo

TRAIN_ARGS = ["--task", "transcribe", "--epochs", "6", "--batch-size", "16", "--checkpoint-every", "0", "--no-progress"]


@pytest.fixture(scope="module")
def speech_demo(tmp_path_factory):
    """About 14 clips per language in training, 3 per language held out (voices and sentences)."""
    return prepare_speech_demo(tmp_path_factory.mktemp("speech"), clips_per_language=16)


@pytest.fixture(scope="module")
def speech_run(speech_demo, tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from layerwise.cli import app

    run = tmp_path_factory.mktemp("runs") / "speech"
    result = CliRunner().invoke(app, ["train", str(speech_demo.train_manifest), "--out", str(run), *TRAIN_ARGS])
    assert result.exit_code == 0, result.stderr
    return run


def rows(manifest: Path) -> list[dict]:
    with manifest.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def write_manifest(path: Path, records: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def test_a_speech_manifest_is_detected_as_transcribe(speech_demo) -> None:
    from layerwise.tasks import detect_task

    assert detect_task(speech_demo.train_manifest) == "transcribe"
    assert detect_task(speech_demo.train_manifest.parent / "nothing.csv") == "classify"


def test_the_run_holds_out_speakers_and_reports_every_language(speech_run) -> None:
    config = json.loads((speech_run / "config.json").read_text())
    metrics = json.loads((speech_run / "metrics.json").read_text())
    assert config["task"] == "transcribe" and "Unicode NFC" in config["preprocessing"]["normalisation"]
    assert set(config["preprocessing"]["alphabet"]["languages"]) == {"de", "en", "es", "fr", "it"}
    assert config["data"]["split"].startswith("by speaker")
    for key in ("wer", "cer", "language_accuracy", "per_language", "real_time_factor"):
        assert key in metrics["metrics"]
    assert sum(part["n"] for part in metrics["metrics"]["per_language"].values()) == metrics["metrics"]["n_clips"]
    assert "val_cer" in json.loads((speech_run / "history.jsonl").read_text().splitlines()[0])
    assert metrics["baseline"]["model"].startswith("pocketsphinx")
    report = (speech_run / "report.html").read_text()
    assert "Per-language error rates" in report and "Worst transcripts" in report


def test_transcribe_prints_the_documented_json(cli, speech_run, speech_demo, tmp_path) -> None:
    clip = Path(rows(speech_demo.synthetic_test_manifest)[0]["path"])
    clip = clip if clip.is_absolute() else speech_demo.synthetic_test_manifest.parent / clip
    silence = tmp_path / "silence.wav"
    soundfile.write(silence, np.zeros(16_000, dtype=np.float32), 16_000)
    code, out, err = cli("transcribe", speech_run, clip, silence, "--json", "--beam-size", "3")
    assert code == 0, err
    first, quiet = (json.loads(line) for line in out.splitlines())
    assert set(first) == {"path", "text", "language", "language_confidence", "seconds_of_audio", "real_time_factor"}
    assert first["path"] == str(clip) and first["language"] in {"de", "en", "es", "fr", "it"}
    assert quiet["text"] == "" and quiet["seconds_of_audio"] == 1.0  # silence: nothing said, no crash
    code, out, _ = cli("transcribe", speech_run, clip, "--json", "--language", "fr")
    assert code == 0 and json.loads(out)["language"] == "fr"


def test_an_unknown_language_or_a_broken_file_is_named(cli, speech_run, tmp_path) -> None:
    clip = tmp_path / "clip.wav"
    soundfile.write(clip, np.zeros(8000, dtype=np.float32), 16_000)
    code, _, err = cli("transcribe", speech_run, clip, "--language", "ja")
    assert code == 2 and "--language 'ja'" in err and "de, en, es, fr, it" in err
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....not audio at all")
    code, out, err = cli("transcribe", speech_run, broken, clip)
    assert code == 2 and str(broken) in err
    assert out.splitlines()[-1].startswith(str(clip))  # the good file after the broken one is still transcribed


def test_evaluate_reports_rates_per_language_and_the_english_baseline(cli, speech_run, speech_demo) -> None:
    code, out, err = cli("evaluate", speech_run, speech_demo.synthetic_test_manifest, "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert (
        0 <= metrics["cer"] and 0 <= metrics["wer"] and set(metrics["per_language"]) == {"de", "en", "es", "fr", "it"}
    )
    baseline = metrics["baseline"]
    assert baseline["n"] == metrics["per_language"]["en"]["n"] and 0 <= baseline["wer"] <= 2


def test_bad_rows_are_named_and_the_rest_trains(speech_demo, tmp_path, cli) -> None:
    good = rows(speech_demo.train_manifest)[:12]
    for row in good:
        row["path"] = str(speech_demo.train_manifest.parent / row["path"])
    truncated = tmp_path / "truncated.wav"
    soundfile.write(truncated, np.random.default_rng(0).normal(0, 0.1, 16_000).astype(np.float32), 16_000)
    truncated.write_bytes(truncated.read_bytes()[:-10_000])
    bad = [
        {**good[0], "path": str(tmp_path / "missing.wav")},
        {**good[1], "text": " ... "},
        {**good[2], "language": "english"},
        {**good[3], "path": str(truncated)},
    ]
    manifest = write_manifest(tmp_path / "manifest.csv", good + bad)
    code, _, err = cli("train", manifest, "--out", tmp_path / "run", "--epochs", "1", "--no-progress")
    assert code == 0, err
    skipped = json.loads((tmp_path / "run" / "problems.json").read_text())["skipped"]
    reasons = " | ".join(f"{p['path']}: {p['reason']}" for p in skipped)
    assert len(skipped) == 4, reasons
    for line in (14, 15, 16, 17):
        assert f"manifest.csv line {line}" in reasons
    assert "truncated" in reasons and "english" in reasons

    nothing = write_manifest(tmp_path / "nothing.csv", bad)
    code, _, err = cli("train", nothing, "--out", tmp_path / "none", "--no-progress")
    assert code == 2 and "usable clip" in err and not (tmp_path / "none" / "model.safetensors").exists()


def test_a_recogniser_starts_from_another_runs_audio_encoder(speech_demo, speech_run, tmp_path, cli) -> None:
    # Two of the five languages: another transcript vocabulary, so the decoder's token tables start fresh
    # while the audio encoder (and whatever else fits) comes from the five-language run.
    two = [r for r in rows(speech_demo.train_manifest) if r["language"] in ("en", "de")][:12]
    for row in two:
        row["path"] = str(speech_demo.train_manifest.parent / row["path"])
    manifest = write_manifest(tmp_path / "two.csv", two)
    code, _, err = cli("train", manifest, "--out", tmp_path / "run", "--init", speech_run, "--epochs", "1",
                       "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "initialised" in err and "from " + str(speech_run) in " ".join(err.split())
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["approach"].startswith("transferred in speech")


def test_batches_depend_only_on_seed_epoch_and_index(speech_demo) -> None:
    """What makes a resumed run exact: batch i of epoch e is the same whether or not batches < i were made."""
    from layerwise.data.speech import load_speech
    from layerwise.data.speech_batches import SpeechBatches

    records = rows(speech_demo.train_manifest)[:24]
    waves = [load_speech(speech_demo.train_manifest.parent / r["path"]) for r in records]
    batches = SpeechBatches(waves, [[1, 2, 3]] * 24, [0] * 24, batch_size=8, n_mels=80, shuffle=True, augment=True)
    whole = list(batches.epoch(2))
    resumed = list(batches.epoch(2, start=1))
    for (a, _), (b, _) in zip(whole[1:], resumed, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(list(batches.epoch(3))[0][0][0], whole[0][0][0])  # another epoch, other augmentation


def test_error_rates_match_jiwer() -> None:
    import jiwer

    from layerwise.tasks.transcribe import error_rates

    references = ["the cat sat on the mat", "buenos días señor", "один два три"]
    hypotheses = ["the cat sat on mat", "buenos dias señora", "один два три четыре"]
    rates = error_rates(references, hypotheses)
    assert rates["wer"] == pytest.approx(jiwer.wer(references, hypotheses))
    assert rates["cer"] == pytest.approx(jiwer.cer(references, hypotheses))


def test_a_recogniser_learns_a_dozen_real_clips_to_cer_zero(speech_demo) -> None:
    """Real espeak-ng clips (no augmentation): the CTC model memorises them exactly."""
    from layerwise.data.speech import Alphabet, load_speech
    from layerwise.data.speech_batches import SpeechBatches
    from layerwise.models import create_model
    from layerwise.models.recogniser import transcribe
    from layerwise.tasks.transcribe import error_rates

    records = [r for r in rows(speech_demo.train_manifest) if len(r["text"]) <= 30][:12]
    alphabet = Alphabet.fit([r["text"] for r in records], [])
    waves = [load_speech(speech_demo.train_manifest.parent / r["path"]) for r in records]
    batches = SpeechBatches(waves, [alphabet.encode(r["text"]) for r in records], [-1] * 12, 12, 80)
    (features, lengths), (tokens, token_lengths, languages) = next(batches.epoch(0))
    torch.manual_seed(0)
    model = create_model("speech_xs", n_mels=80, vocab_size=alphabet.vocab_size, n_languages=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    references = [alphabet.decode(tokens[i, : token_lengths[i]].tolist()) for i in range(12)]
    cer, started = 1.0, time.perf_counter()
    for step in range(600):
        model.train()
        loss, _ = model.loss(features, lengths, tokens, token_lengths, languages)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 24:
            hypotheses = [alphabet.decode(h.tokens) for h in transcribe(model, features, lengths)]
            cer = error_rates(references, hypotheses)["cer"]
            if cer == 0:
                break
    print(f"CER {cer:.3f} after {step + 1} steps, {time.perf_counter() - started:.0f} s")
    assert cer == 0


@pytest.mark.slow
def test_packed_clips_train_to_the_weights_of_the_files(cli, speech_demo, speech_run, tmp_path) -> None:
    # The clips decoded once into one mapped file, the split and alphabet fixed in the pack: training from it must
    # be training on the files.
    from safetensors.torch import load_file

    code, _, err = cli("pack", speech_demo.train_manifest, "--out", tmp_path / "packed")  # the task is detected
    assert code == 0, err
    index = json.loads((tmp_path / "packed" / "index.json").read_text())
    assert (index["task"], index["units"]) == ("transcribe", "clips")
    code, _, err = cli("train", tmp_path / "packed", "--out", tmp_path / "run", *TRAIN_ARGS)
    assert code == 0, err
    a, b = load_file(str(tmp_path / "run" / "model.safetensors")), load_file(str(speech_run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["packed_from"] == str(speech_demo.train_manifest)
    assert config["data"]["fingerprint"] == json.loads((speech_run / "config.json").read_text())["data"]["fingerprint"]
    code, _, err = cli("evaluate", tmp_path / "run", tmp_path / "packed")  # raw files are needed: the pack names them
    assert code == 2 and f"give the data it was packed from ({speech_demo.train_manifest})" in err
    shutil.copytree(tmp_path / "packed", tmp_path / "damaged")
    (tmp_path / "damaged" / "clips.safetensors").write_bytes(b"not a clip table")
    code, _, err = cli("train", tmp_path / "damaged", "--out", tmp_path / "never", *TRAIN_ARGS)
    assert code == 2 and "clips.safetensors: not a readable clip table" in err


def test_packing_holds_one_clip_at_a_time_and_leaves_a_refused_clip_out_of_the_table(tmp_path) -> None:
    # Clips are written as they are decoded; the length limit is known only once all are read, so a clip far
    # longer than the rest stays in the waveform file but not in the clip table, and is named as refused.
    from layerwise.data.speech import load_speech
    from layerwise.pack import pack
    from layerwise.tasks import task_class
    from layerwise.tasks.base import FitOptions

    rng = np.random.default_rng(0)
    records = []
    for i in range(40):
        seconds = 40.0 if i == 7 else 0.5 + 0.01 * i
        path = tmp_path / f"clip{i:02d}.wav"
        soundfile.write(path, rng.normal(0, 0.1, int(seconds * 16_000)).astype(np.float32), 16_000)
        records.append({"path": str(path), "text": f"clip number {i}"})
    manifest = write_manifest(tmp_path / "manifest.csv", records)
    index = pack(manifest, tmp_path / "packed", log=lambda _: None)
    assert index["n_train"] + index["n_val"] == 39
    assert [p["path"] for p in index["skipped"]] == ["manifest.csv line 9"]
    assert "40.0 s long" in index["skipped"][0]["reason"]
    prepared = task_class("transcribe").prepare(tmp_path / "packed", FitOptions(), log=lambda _: None)
    clips = prepared.extras["val_batches_all"].waves + prepared.train_batches.waves
    assert len(clips) == 39 and sum(len(w) for w in clips) < index["shards"][0]["count"]  # the 40 s clip is a gap
    by_length = {len(w): w for w in clips}
    for record in records[:7] + records[8:]:
        wave = load_speech(Path(record["path"]), None)
        assert np.array_equal(by_length[len(wave)], wave)


@pytest.mark.slow
def test_a_killed_transcribe_run_resumes_bitwise_identical(speech_demo, speech_run, tmp_path) -> None:
    from safetensors.torch import load_file

    run = tmp_path / "killed"
    command = [sys.executable, "-m", "layerwise", "train", str(speech_demo.train_manifest), "--out", str(run),
               *TRAIN_ARGS]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240

    def steps_saved() -> list[int]:
        folder = run / "checkpoints"
        return [int(p.name.split("_")[1].split(".")[0]) for p in folder.glob("step_*")] if folder.is_dir() else []

    while not any(6 <= step < 20 for step in steps_saved()):  # killed mid-run: 24 steps in all
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(str(run / "model.safetensors")), load_file(str(speech_run / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_serve_transcribes_an_upload(speech_run, speech_demo) -> None:
    import httpx
    from test_serve import running_server

    clip = speech_demo.synthetic_test_manifest.parent / rows(speech_demo.synthetic_test_manifest)[0]["path"]
    with running_server(speech_run) as url:
        assert httpx.get(f"{url}/model").json()["task"] == "transcribe"
        files = [("files", ("clip.flac", clip.read_bytes(), "audio/flac"))]
        answer = httpx.post(f"{url}/predict", files=files, timeout=60).json()["predictions"][0]
    assert answer["path"] == "clip.flac" and set(answer) >= {"text", "language", "language_confidence"}
