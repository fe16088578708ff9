"""Transcribe: speech in, text and its language out, one model for every language in the data.

Targets come from a CSV manifest (data/speech.py: `path`, `text`, optional `language`, `speaker`); the
split holds out whole speakers when the manifest names them, so validation measures voices the model
has never heard; the network is models/recogniser.py (log-mel -> conv stem -> transformer encoder ->
CTC and language heads, optionally a decoder); the monitor is the character error rate; the honest
baseline is CMU PocketSphinx on the English clips (tasks/speech_baseline.py). Error rates are
computed with torchmetrics, never by hand.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from layerwise.data.sources import Example, Problem
from layerwise.data.speech import NORMALISATION_RULES, SAMPLE_RATE, Alphabet, Utterance
from layerwise.errors import DecodeError, InputError
from layerwise.models.registry import model_entry
from layerwise.runtime import model_device
from layerwise.tasks.base import FitOptions, PackOptions, Prepared, RunMismatch, fingerprint

if TYPE_CHECKING:
    from layerwise.serve.export import Graph

DEFAULT_MODEL = "speech_xs"
N_MELS = 80
BATCH = 32
EVAL_BATCH = 64
EVAL_CLIPS = 400  # validation clips decoded every epoch (all of them at the end)
DEFAULT_LR = 4e-3  # speech demo, 150 s: CER 0.39 at 4e-3 vs 0.56 at 2e-3 (200 s)
WORST_SHOWN = 10  # worst validation transcripts in the report
BASELINE_CLIPS = 100  # English clips PocketSphinx transcribes for the baseline (about 1 s each on 2 cores)
MIN_CLIPS = 4
PATIENCE = 20  # epochs: CTC emits only blanks (CER 100%) for hundreds of steps before the first characters


@dataclass(frozen=True)
class TranscriptResult:
    path: str
    text: str
    language: str | None
    language_confidence: float | None
    seconds_of_audio: float
    real_time_factor: float

    def to_json(self) -> dict:
        confidence = None if self.language_confidence is None else round(self.language_confidence, 4)
        return {
            "path": self.path, "text": self.text, "language": self.language, "language_confidence": confidence,
            "seconds_of_audio": round(self.seconds_of_audio, 3), "real_time_factor": round(self.real_time_factor, 4),
        }  # fmt: skip

    def to_line(self) -> str:
        return f"{self.path}\t{self.text}"


class TranscribeTask:
    """A fitted transcribe task: the alphabet and languages, the clip length the model takes, the text rules."""

    name = "transcribe"
    modality = "audio"
    monitor = "cer"
    higher_is_better = False
    commands = frozenset({"transcribe", "predict", "evaluate"})

    def __init__(self, alphabet: Alphabet, max_seconds: float, n_mels: int = N_MELS) -> None:
        self.alphabet, self.max_seconds, self.n_mels = alphabet, max_seconds, n_mels

    @classmethod
    def claims(cls, data: Path) -> bool:
        return find_speech_manifest(Path(data)) is not None

    def to_json(self) -> dict:
        return {
            "modality": "audio",
            "preprocessing": {
                "modality": "audio", "sample_rate": SAMPLE_RATE, "n_mels": self.n_mels, "max_seconds": self.max_seconds,
                "alphabet": self.alphabet.to_json(), "normalisation": NORMALISATION_RULES,
            },
        }  # fmt: skip

    @classmethod
    def from_config(cls, config: dict) -> TranscribeTask:
        prep = config["preprocessing"]
        return cls(Alphabet.from_json(prep["alphabet"]), float(prep["max_seconds"]), int(prep["n_mels"]))

    # ------------------------------------------------------------------ training

    def loss(self, model: nn.Module, inputs: tuple, targets: tuple) -> tuple[torch.Tensor, dict]:
        features, lengths = inputs
        tokens, token_lengths, languages = targets
        return model.loss(features, lengths, tokens, token_lengths, languages)

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        """Validation loss, CER, WER and language accuracy with greedy decoding."""
        scored = self.decode_batches(model, batches, with_loss=True)
        metrics = error_rates(scored["references"], scored["hypotheses"])
        metrics["loss"] = float(np.mean(scored["losses"]))
        if self.alphabet.languages:
            metrics["language_accuracy"] = language_accuracy(scored["languages"], scored["predicted_languages"])
        return metrics

    @torch.no_grad()
    def decode_batches(self, model: nn.Module, batches, with_loss: bool = False) -> dict:
        """References, greedy hypotheses and languages (true and predicted) of every clip, in batch order."""
        from layerwise.models.recogniser import DecodingOptions, transcribe

        was_training = model.training
        model.eval()
        device = model_device(model)
        out: dict = {"references": [], "hypotheses": [], "languages": [], "predicted_languages": [], "losses": []}
        for (features, lengths), (tokens, token_lengths, languages) in batches.epoch(0):
            features, lengths = features.to(device), lengths.to(device)
            if with_loss:
                loss, _ = model.loss(
                    features, lengths, tokens.to(device), token_lengths.to(device), languages.to(device)
                )
                out["losses"].append(float(loss))
            for row, hypothesis in enumerate(transcribe(model, features, lengths, DecodingOptions())):
                out["references"].append(self.alphabet.decode(tokens[row, : token_lengths[row]].tolist()))
                out["hypotheses"].append(self.alphabet.decode(hypothesis.tokens))
                out["languages"].append(int(languages[row]))
                out["predicted_languages"].append(-1 if hypothesis.language is None else int(hypothesis.language))
        model.train(was_training)
        return out

    @classmethod
    def prepare(cls, data: Path, options: FitOptions, saved: dict | None = None, donor=None, log=print) -> Prepared:
        from layerwise.data.shards import is_shard_folder
        from layerwise.data.speech_batches import SpeechBatches

        started = time.perf_counter()
        clips = (
            packed_clips(data, options, saved, log) if is_shard_folder(data) else raw_clips(data, options, saved, log)
        )
        utterances, waves, alphabet, max_seconds = clips.utterances, clips.waves, clips.alphabet, clips.max_seconds
        train_index, val_index, split_rule = clips.train_index, clips.val_index, clips.split_rule
        data_summary = clips.summary | {"n_train": len(train_index), "n_val": len(val_index)}
        if saved is not None and saved["data"].get("fingerprint") not in (None, data_summary["fingerprint"]):
            raise RunMismatch(f"--resume: the clips of {data} differ from the ones the run started on")
        model_name = options.model or DEFAULT_MODEL
        entry = model_entry(model_name)
        if "transcribe" not in entry.tasks:
            raise InputError(f"--model {model_name} does not transcribe speech (speech models: speech_xs, speech_s, "
                             "speech_xs_decoder, speech_s_decoder)")  # fmt: skip
        task = cls(alphabet, max_seconds)
        tokens = [alphabet.encode(u.text) for u in utterances]
        language_ids = [task.language_id(u.language) for u in utterances]

        def batches(index: list[int], **kwargs) -> SpeechBatches:
            pick = lambda values: [values[i] for i in index]  # noqa: E731
            return SpeechBatches(pick(waves), pick(tokens), pick(language_ids), n_mels=N_MELS, **kwargs)

        def train_batches(size: int) -> SpeechBatches:
            return batches(train_index, batch_size=size, shuffle=True, augment=True, seed=options.seed)

        batch = options.batch_size or BATCH
        frames = int(max_seconds * SAMPLE_RATE / 160 / 4) + 8  # encoder positions after the 4x stem
        return Prepared(
            task=task,
            train_batches=train_batches(batch),
            batches_of=train_batches,
            val_batches=batches(val_index[:EVAL_CLIPS], batch_size=EVAL_BATCH),
            model_name=model_name,
            model_config={
                "n_mels": N_MELS,
                "vocab_size": alphabet.vocab_size,
                "n_languages": len(alphabet.languages),
                "max_frames": frames,
                "max_text_tokens": max(len(t) for t in tokens) * 2 + 8,
            },  # fmt: skip
            data_summary=data_summary,
            problems=clips.problems,
            batch_size=batch,
            lr=DEFAULT_LR,
            patience=PATIENCE,
            extras={
                "val_utterances": [utterances[i] for i in val_index],
                "val_batches_all": batches(val_index, batch_size=EVAL_BATCH),
                "decode_seconds": time.perf_counter() - started,
                "split": f"validation: {split_rule}; {len(val_index)} clips (also used for early stopping)",
            },
        )

    @classmethod
    def pack_into(cls, data: Path, staging: Path, options: PackOptions, log=print) -> dict:
        """`layerwise pack` for transcription (see `pack_clips`); one waveform file, whatever shard_size."""
        if options.modality not in (None, "audio"):
            raise InputError(f"--modality {options.modality}: transcription learns from audio")
        return pack_clips(data, staging, options, log)

    def language_id(self, language: str | None) -> int:
        return self.alphabet.languages.index(language) if language in self.alphabet.languages else -1

    # ------------------------------------------------------------------ after training

    def final_metrics(self, network: nn.Module, prepared: Prepared) -> dict:
        started = time.perf_counter()
        batches = prepared.extras["val_batches_all"]
        scored = self.decode_batches(network, batches)
        seconds_of_audio = float(sum(batches.lengths)) / SAMPLE_RATE
        metrics = self.score(scored)
        metrics["real_time_factor"] = round((time.perf_counter() - started) / max(seconds_of_audio, 1e-9), 4)
        # Batches are sorted by length: row j of `scored` is validation clip order[j].
        scored["order"] = np.concatenate(batches.batch_indices(0)).tolist()
        prepared.extras["scored"] = scored
        return metrics

    def score(self, scored: dict) -> dict:
        """WER, CER and language accuracy overall and per language (`per_language`)."""
        metrics = error_rates(scored["references"], scored["hypotheses"])
        metrics["n_clips"] = len(scored["references"])
        if not self.alphabet.languages:
            return metrics
        metrics["language_accuracy"] = language_accuracy(scored["languages"], scored["predicted_languages"])
        per_language = {}
        for i, code in enumerate(self.alphabet.languages):
            rows = [j for j, language in enumerate(scored["languages"]) if language == i]
            if rows:
                part = error_rates([scored["references"][j] for j in rows], [scored["hypotheses"][j] for j in rows])
                part["language_accuracy"] = language_accuracy(
                    [i] * len(rows), [scored["predicted_languages"][j] for j in rows]
                )
                per_language[code] = part | {"n": len(rows)}
        metrics["per_language"] = per_language
        return metrics

    def baseline(self, prepared: Prepared, seed: int) -> dict:
        scored = prepared.extras["scored"]
        english = [
            j for j, language in enumerate(scored["languages"])
            if language >= 0 and self.alphabet.languages[language] == "en"
        ][:BASELINE_CLIPS]  # fmt: skip
        waves = prepared.extras["val_batches_all"].waves
        return english_baseline(
            [(waves[scored["order"][j]], scored["references"][j]) for j in english],
            [scored["hypotheses"][j] for j in english],
            has_languages=bool(self.alphabet.languages),
        )

    def verdict(self, metrics: dict, baseline: dict, approach: str = "from scratch") -> str:
        from layerwise.baseline import verdict

        headline = f"The network's WER is {metrics['wer']:.1%} (CER {metrics['cer']:.1%}) on held-out clips."
        if baseline.get("wer") is None:
            return f"{headline} No classical baseline applies: {baseline.get('note', 'none is available')}."
        return f"{headline} On the English clips: " + verdict(
            1 - baseline["network_wer"],
            1 - baseline["wer"],
            metric="word accuracy (1 − WER) ",
            show=lambda v: f"{v:.1%}",
            approach=approach,
        )

    def summary_rows(self, summary: dict) -> list[tuple[str, str]]:
        metrics, baseline = summary["metrics"], summary["baseline"]
        rows = [(f"deep: {summary['model']}", f"WER {metrics['wer']:.1%}  CER {metrics['cer']:.1%}")]
        for code, part in metrics.get("per_language", {}).items():
            rows.append((f"  {code} ({part['n']} clips)", f"WER {part['wer']:.1%}  CER {part['cer']:.1%}"))
        if baseline.get("wer") is not None:
            rows.append((f"deep, English ({baseline['n']} clips)", f"WER {baseline['network_wer']:.1%}"))
            rows.append((f"classical: {baseline['model']}", f"WER {baseline['wer']:.1%}"))
        return rows

    def write_report(self, run_dir: Path, bundle, summary: dict, result, prepared: Prepared, log=print) -> None:
        from layerwise.report.transcribe_sections import transcribe_sections
        from layerwise.tasks.classify import write_task_report

        scored, metrics, baseline = prepared.extras["scored"], summary["metrics"], summary["baseline"]
        per_language = dict(metrics.get("per_language", {}))
        per_language["all"] = {k: metrics[k] for k in ("wer", "cer") if k in metrics} | {
            "n": metrics["n_clips"], "language_accuracy": metrics.get("language_accuracy")}  # fmt: skip
        sections = transcribe_sections(
            result.history, per_language, self.worst(scored, prepared.extras["val_utterances"]),
            self.language_confusion(scored), baseline,
        )  # fmt: skip
        write_task_report(run_dir, bundle, summary, result, prepared, self, {}, sections)

    def worst(self, scored: dict, utterances: list[Utterance]) -> list[dict]:
        """The validation clips with the highest CER (batches are sorted by length: map rows back to clips)."""
        from torchmetrics.functional.text import char_error_rate

        rows = []
        for row, (reference, hypothesis) in enumerate(zip(scored["references"], scored["hypotheses"], strict=True)):
            language = scored["languages"][row]
            rows.append({
                "origin": utterances[scored["order"][row]].origin, "reference": reference, "hypothesis": hypothesis,
                "language": self.alphabet.languages[language] if language >= 0 else "",
                "cer": float(char_error_rate(hypothesis, reference)),
            })  # fmt: skip
        return sorted(rows, key=lambda r: -r["cer"])[:WORST_SHOWN]

    def language_confusion(self, scored: dict) -> dict | None:
        labels = list(self.alphabet.languages)
        if not labels:
            return None
        matrix = np.zeros((len(labels), len(labels)), dtype=int)
        for true, predicted in zip(scored["languages"], scored["predicted_languages"], strict=True):
            if true >= 0 and predicted >= 0:
                matrix[true, predicted] += 1
        return {"labels": labels, "matrix": matrix.tolist()}

    # ------------------------------------------------------------------ inference

    def check_language(self, language: str | None) -> int | None:
        if language is None:
            return None
        if not self.alphabet.languages:
            raise InputError("--language: this run was trained without languages in its manifest")
        if language not in self.alphabet.languages:
            raise InputError(f"--language {language!r}: this run knows {', '.join(self.alphabet.languages)}")
        return self.alphabet.languages.index(language)

    @torch.no_grad()
    def transcribe_wave(
        self, network: nn.Module, wave: np.ndarray, language: int | None = None, beam_size: int = 1
    ) -> tuple[str, int | None, float | None]:
        """Text, language id and its confidence for one recording of any length: cut at silences into chunks the
        model takes, each decoded (in its own detected language unless one is forced), the texts joined; the
        recording's language is the chunks' language distributions averaged, weighted by length."""
        from layerwise.data.speech import log_mel_batch, speech_segments
        from layerwise.models.recogniser import DecodingOptions, transcribe

        segments = speech_segments(wave, self.max_seconds)
        if not segments:
            return "", None, None  # silence: nothing was said
        network.eval()
        device = model_device(network)
        features, lengths = log_mel_batch([wave[start:end] for start, end in segments], self.n_mels)
        hypotheses = transcribe(
            network, features.to(device), lengths.to(device), DecodingOptions(beam_size=beam_size, language=language)
        )
        text = " ".join(t for t in (self.alphabet.decode(h.tokens).strip() for h in hypotheses) if t)
        if not self.alphabet.languages:
            return text, None, None
        weights = lengths.float() / lengths.sum()  # longer chunks say more about the language
        probabilities = (torch.tensor([h.language_probabilities for h in hypotheses]) * weights[:, None]).sum(0)
        language = int(probabilities.argmax()) if language is None else language
        return text, language, float(probabilities[language])

    def transcribe_examples(
        self, network: nn.Module, examples: list[Example], language: str | None = None, beam_size: int = 1
    ):
        """TranscriptResults (and Problems for files that cannot be read), one example at a time."""
        from layerwise.data.speech import load_speech

        if beam_size < 1:
            raise InputError(f"--beam-size must be at least 1, not {beam_size}")
        forced = self.check_language(language)
        for example in examples:
            try:
                wave = load_speech(example.path)
            except DecodeError as err:
                yield Problem(example.origin, str(err))
                continue
            started = time.perf_counter()
            text, language_index, confidence = self.transcribe_wave(network, wave, forced, beam_size)
            seconds = len(wave) / SAMPLE_RATE
            yield TranscriptResult(
                example.origin, text, None if language_index is None else self.alphabet.languages[language_index],
                confidence, seconds, (time.perf_counter() - started) / max(seconds, 1e-9),
            )  # fmt: skip

    def find_inputs(self, inputs: list, texts: list[str] | None = None) -> tuple[list[Example], list[Problem]]:
        from layerwise.data.sources import discover_files

        if texts:
            raise InputError("--text: this run transcribes audio, not text")
        source = discover_files([Path(item) for item in inputs], "audio")
        return source.examples, source.problems

    def predict(self, network: nn.Module, inputs: list, texts=None, k: int = 3, **options):
        examples, problems = self.find_inputs(inputs, texts)
        results = []
        for item in self.transcribe_examples(network, examples, options.get("language"), options.get("beam_size", 1)):
            (problems if isinstance(item, Problem) else results).append(item)
        return results, problems

    def predict_stream(self, network: nn.Module, examples: list, k: int = 3):
        yield from self.transcribe_examples(network, examples)

    def evaluate_data(self, network: nn.Module, data: str | Path) -> tuple[dict, list[Problem]]:
        """WER, CER and language accuracy (overall and per language) on a held-out manifest; recordings are
        transcribed as `transcribe` does (cut at silences), and PocketSphinx scores the English ones."""
        from layerwise.data.speech import normalise_text

        manifest = find_speech_manifest(Path(data))
        if manifest is None:
            raise InputError(f"{data}: no speech manifest to evaluate")
        clips, problems, _ = load_clips(manifest, max_seconds=math.inf)  # long recordings are cut at silences
        if not clips:
            raise InputError(f"{data}: no usable clip to evaluate" + "".join(
                f"\n  {p.origin}: {p.reason}" for p in problems[:10]))  # fmt: skip
        scored: dict = {"references": [], "hypotheses": [], "languages": [], "predicted_languages": []}
        started, seconds = time.perf_counter(), 0.0
        for utterance, wave in clips:
            text, language, _ = self.transcribe_wave(network, wave)
            scored["references"].append(utterance.text)
            scored["hypotheses"].append(normalise_text(text))
            scored["languages"].append(self.language_id(utterance.language))
            scored["predicted_languages"].append(-1 if language is None else language)
            seconds += len(wave) / SAMPLE_RATE
        metrics = self.score(scored)
        metrics["real_time_factor"] = round((time.perf_counter() - started) / max(seconds, 1e-9), 4)
        english = [j for j, (u, _) in enumerate(clips) if u.language == "en"][:BASELINE_CLIPS]
        metrics["baseline"] = english_baseline(
            [(clips[j][1], clips[j][0].text) for j in english], [scored["hypotheses"][j] for j in english],
            has_languages=any(u.language for u, _ in clips),
        )  # fmt: skip
        return metrics, problems

    # ------------------------------------------------------------------ export

    @torch.no_grad()
    def export_graphs(self, network: nn.Module, data: Path, n: int) -> list[Graph]:
        """`layerwise export`: the audio encoder (with the language head, and CTC for CTC-only models) and, for
        models with a decoder, its next-token logits; the decoding loop stays outside (see `export_decoding`).
        Inputs are the first speech chunk of up to `n` clips of `data`, cut and featurised as `transcribe_wave`
        does; the decoder's tokens are each clip's prompt (in the detected language) and its reference text."""
        from layerwise.data.speech import load_utterances, log_mel_batch, read_speech_manifest, speech_segments
        from layerwise.models.recogniser import DecoderLogits, EncoderOutputs
        from layerwise.serve.export import MAX_BATCH, Graph

        manifest = find_speech_manifest(Path(data))
        if manifest is None:
            raise InputError(f"{data}: no speech manifest to take the parity check's clips from")
        utterances = read_speech_manifest(manifest)[0]
        waves, kept, _ = load_utterances(utterances[:: max(1, len(utterances) // n)][:n], None)
        chunks = [(u, w[slice(*segments[0])]) for u, w in zip(kept, waves, strict=True)
                  if (segments := speech_segments(w, self.max_seconds))]  # fmt: skip
        if not chunks:
            raise InputError(f"{manifest}: no readable clip with speech for the parity check")
        features, lengths = log_mel_batch([wave for _, wave in chunks], self.n_mels)  # (B, n_mels, T), (B,)
        short = max(1, features.shape[2] // 2)  # variant: the same clips cut to half the frames
        short_inputs = (features[:, :, :short].contiguous(), lengths.clamp(max=short))

        encoder = EncoderOutputs(network).eval()
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        # The encoder takes at most max_frames frames after its 4x downsampling: 4 * max_frames input frames.
        frames = torch.export.Dim("frames", min=1, max=4 * network.config.max_frames)
        meaning = (
            "encoded (batch, encoder_frames, dim): the audio encoder's output, one row per 40 ms, zero past "
            "enc_lengths (batch,), each clip's valid encoder frames"
        )
        if "language_logits" in encoder.output_names:
            meaning += "; language_logits (batch, n_languages): softmax gives each clip's language, in the order of "
            meaning += "preprocessing.alphabet.languages"
        if "ctc_log_probs" in encoder.output_names:
            meaning += "; ctc_log_probs (batch, encoder_frames, vocab_size): each frame's log-probabilities of the "
            meaning += "CTC blank (id 0) and of each character (id i: preprocessing.alphabet.characters[i - 1])"
        graphs = [
            Graph(encoder, (features, lengths), ("features", "lengths"), encoder.output_names,
                  ({0: batch, 2: frames}, {0: batch}), meaning, variants=(short_inputs,))
        ]  # fmt: skip
        if network.decoder is None:
            return graphs

        encoded, enc_lengths, *rest = encoder(features, lengths)
        languages = rest[0].argmax(dim=-1) if network.language_head is not None else None
        texts = [self.alphabet.encode(u.text)[: network.config.max_text_tokens] for u, _ in chunks]
        width = network.prompt_length + max(map(len, texts))
        tokens = torch.full((len(texts), width), network.eot, dtype=torch.int64)  # finished rows go on with eot
        tokens[:, : network.prompt_length] = network.prompts(languages).expand(len(texts), -1)
        for row, text in enumerate(texts):
            tokens[row, network.prompt_length : network.prompt_length + len(text)] = torch.tensor(text)
        short_encoded, short_enc_lengths = encoder(*short_inputs)[:2]
        short_tokens = tokens[:, : network.prompt_length + 1]  # the prompt and one character
        positions = torch.export.Dim("tokens", min=1, max=network.decoder.context_len)
        encoder_frames = torch.export.Dim("encoder_frames", min=1, max=network.config.max_frames)
        meaning = (
            "logits (batch, tokens, decoder_vocab): position i's scores for the token after tokens[:, i], over "
            "the characters (ids 0 to vocab_size - 1, 0 unused), then sot, eot, transcribe and one token per "
            "language; greedy decoding takes the last position's argmax over the characters and eot (see decoding)"
        )
        decoder = Graph(
            DecoderLogits(network).eval(), (tokens, encoded, enc_lengths), ("tokens", "encoded", "enc_lengths"),
            ("logits",), ({0: batch, 1: positions}, {0: batch, 1: encoder_frames}, {0: batch}), meaning,
            suffix="decoder", variants=((short_tokens, short_encoded, short_enc_lengths),),
        )  # fmt: skip
        return [*graphs, decoder]

    def export_decoding(self) -> str:
        """How to turn audio into text with the exported graphs, numpy and onnxruntime alone."""
        from layerwise.data.speech import HOP_LENGTH, LOG_MEL_RANGE, N_FFT

        v = self.alphabet.vocab_size  # characters are ids 1..v-1; id 0 is CTC's blank
        named = ", ".join(f"{v + 3 + i} {code}" for i, code in enumerate(self.alphabet.languages))
        prompt = f"[{v}, language token, {v + 2}]" if named else f"[{v}, {v + 2}]"
        language = (
            "3) Language: argmax of language_logits (index i is preprocessing.alphabet.languages[i]; for a "
            "recording cut into chunks, layerwise averages the chunks' softmaxes weighted by their T; "
            f"`--language` forces one). Its token is {v + 3} + i: {named}. "
            if named
            else "3) This run has no languages: no language token. "
        )
        return (
            f"1) Audio: mono float32 samples at preprocessing.sample_rate ({SAMPLE_RATE} Hz), in chunks of at most "
            "preprocessing.max_seconds. `layerwise transcribe` cuts a recording at its silences (energy voice "
            "activity detection on 30 ms frames, 0.1 s kept each side of speech), transcribes every chunk and "
            "joins the non-empty texts with one space; any cut at pauses works (optional for you). "
            f"2) Features of a chunk of n samples: pad {N_FFT // 2} zeros at each end; frames of n_fft {N_FFT} "
            f"samples every hop {HOP_LENGTH} samples, T = n // {HOP_LENGTH} + 1 of them; times a periodic Hann "
            "window (0.5 - 0.5 cos(2 pi k / n_fft)); power |rfft|^2; preprocessing.n_mels triangular HTK mel "
            f"filters, unnormalised: n_mels + 2 edges equally spaced in mel = 2595 log10(1 + hz / 700) from 0 to "
            f"{SAMPLE_RATE // 2} Hz, evaluated at the rfft bins' frequencies; log10(max(mel power, 1e-10)); "
            f"floor = the maximum of that (n_mels, T) array minus {LOG_MEL_RANGE:g}; features = "
            "(max(log, floor) + 4) / 4 as float32 (1, n_mels, T) and lengths = [T] as int64. To batch chunks, "
            "pad T with any value: frames past each chunk's length are ignored. Run the main graph. "
            + language
            + "4) With a decoder (graphs[1]), greedy decoding, as `layerwise transcribe --beam-size 1`: tokens = "
            f"{prompt} as int64 (1, S) (sot {v}, eot {v + 1}, transcribe {v + 2}); run the decoder graph on "
            "(tokens, encoded, enc_lengths); of logits[0, -1], consider only the characters (ids 1 to "
            f"{v - 1}) and eot ({v + 1}); stop if the best is eot, else append it and run again; after "
            "model.config.max_text_tokens characters the text ends. Without a decoder (CTC-only models): the "
            "argmax of ctc_log_probs at each of the first enc_lengths frames; merge runs of the same id, then "
            "drop the blank (0). 5) Text: id i is preprocessing.alphabet.characters[i - 1]; strip spaces at both "
            "ends. Transcripts are lowercase and normalised as preprocessing.normalisation says."
        )


# ---------------------------------------------------------------------- helpers


@dataclass
class SpeechClips:
    """What a transcribe run is prepared from, read from a manifest's files or from a pack."""

    utterances: list[Utterance]
    waves: list  # float32 at SAMPLE_RATE, one per utterance (views of one mapped file for a pack); while packing,
    # where each was written
    problems: list[Problem]
    alphabet: Alphabet
    max_seconds: float
    train_index: list[int]
    val_index: list[int]
    split_rule: str
    summary: dict  # config.json's "data", less the split's sizes


def raw_clips(
    data: Path, options: FitOptions, saved: dict | None, log=print, keep: Callable[[np.ndarray], Any] = lambda w: w
) -> SpeechClips:
    """The clips of a speech manifest, decoded (`keep`: see `load_clips`); the alphabet fitted (or the resumed
    run's) and the split made."""
    manifest = find_speech_manifest(Path(data))
    if manifest is None:
        raise InputError(f"{data}: no speech manifest (a CSV with `path` and `text`, a folder with manifest.csv, "
                         "or metadata.csv with `file_name` and `transcription`)")  # fmt: skip
    clips, problems, info = load_clips(manifest, None if saved is None else saved["preprocessing"]["max_seconds"], keep)
    log(f"{manifest}: {info['rows']} rows, {len(clips)} usable clips"
        + (f" in {len(info['languages'])} languages ({', '.join(info['languages'])})"
           if info["languages"] else ""))  # fmt: skip
    if info.get("unknown_characters"):
        shown = " ".join(f"{c!r}×{n}" for c, n in list(info["unknown_characters"].items())[:10])
        log(f"note: transcripts hold characters outside every known script (kept): {shown}")
    if len(clips) < MIN_CLIPS:
        raise InputError(f"{manifest}: {len(clips)} usable clip(s); at least {MIN_CLIPS} are needed"
                         + "".join(f"\n  {p.origin}: {p.reason}" for p in problems[:10]))  # fmt: skip
    utterances = [u for u, _ in clips]
    if saved is not None:
        alphabet = Alphabet.from_json(saved["preprocessing"]["alphabet"])
        max_seconds = float(saved["preprocessing"]["max_seconds"])
    else:
        alphabet = Alphabet.fit([u.text for u in utterances], info["languages"])
        max_seconds = info["max_seconds"]
    train_index, val_index, split_rule = split_clips(utterances, options.val_fraction, options.seed)
    log(f"split: {len(train_index)} training, {len(val_index)} validation clips; {split_rule}")
    summary = {
        "source": str(manifest), "format": "speech manifest", "n_skipped": len(problems),
        "val_fraction": options.val_fraction, "split": split_rule, "languages": list(alphabet.languages),
        "max_seconds": max_seconds, "unknown_characters": info.get("unknown_characters", {}),
        "duplicates": info.get("duplicates", 0), "hours": round(info["samples"] / SAMPLE_RATE / 3600, 3),
        "fingerprint": fingerprint([f"{u.origin} {u.path} {u.text} {u.language}" for u in utterances]),
    }  # fmt: skip
    waves = [w for _, w in clips]
    return SpeechClips(utterances, waves, problems, alphabet, max_seconds, train_index, val_index, split_rule, summary)


# The files of packed speech (besides index.json): every clip's samples end to end, where each one is and the
# split (offsets, lengths, train_index, val_index), and each clip's transcript (JSON lines).
PACKED_WAVES, PACKED_CLIPS, PACKED_UTTERANCES = "waves.f32", "clips.safetensors", "utterances.jsonl"


def pack_clips(data: Path, staging: Path, options: PackOptions, log=print) -> dict:
    """`layerwise pack DATA --task transcribe`: the clips decoded (resampled to 16 kHz) once, as `train` would
    decode them, into one float32 file, with the alphabet, the split and the transcripts. Returns index.json's
    task entries."""
    from safetensors.torch import save_file

    with open(staging / PACKED_WAVES, "wb") as f:

        def write(wave: np.ndarray) -> tuple[int, int]:  # one clip at a time: packing holds no more in memory
            offset = f.tell() // 4
            f.write(np.ascontiguousarray(wave, dtype=np.float32).tobytes())
            return offset, len(wave)

        clips = raw_clips(data, FitOptions(val_fraction=options.val_fraction, seed=options.seed), None, log, write)
        n_samples = f.tell() // 4  # refused clips (far too long) stay in the file, out of the clip table
    offsets = np.array([offset for offset, _ in clips.waves], dtype=np.int64)
    lengths = np.array([length for _, length in clips.waves], dtype=np.int64)
    save_file({
        "offsets": torch.from_numpy(offsets), "lengths": torch.from_numpy(lengths),
        "train_index": torch.tensor(clips.train_index, dtype=torch.int64),
        "val_index": torch.tensor(clips.val_index, dtype=torch.int64),
    }, str(staging / PACKED_CLIPS))  # fmt: skip
    with open(staging / PACKED_UTTERANCES, "w", encoding="utf-8") as f:
        for u in clips.utterances:
            row = {"origin": u.origin, "path": str(u.path), "text": u.text, "language": u.language}
            f.write(json.dumps(row | {"speaker": u.speaker}, ensure_ascii=False) + "\n")
    task = TranscribeTask(clips.alphabet, clips.max_seconds)
    return {
        **task.to_json(), "source": clips.summary["source"], "units": "clips", "n_train": len(clips.train_index),
        "n_val": len(clips.val_index), "val_fraction": options.val_fraction, "seed": options.seed,
        "summary": clips.summary,
        "shards": [{"file": name, "split": "all", "count": count} for name, count in (
            (PACKED_WAVES, n_samples), (PACKED_CLIPS, len(lengths)), (PACKED_UTTERANCES, len(lengths)))],
        "skipped": [p.to_json() for p in clips.problems],
    }  # fmt: skip


def packed_clips(data: Path, options: FitOptions, saved: dict | None, log=print) -> SpeechClips:
    """A folder `pack_clips` wrote: its waveform file mapped (a clip is read when a batch takes it), its split."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from layerwise.data.shards import read_pack

    index = read_pack(data, "transcribe", options.val_fraction, log)
    preprocessing = saved["preprocessing"] if saved is not None else index["preprocessing"]
    alphabet, max_seconds = Alphabet.from_json(preprocessing["alphabet"]), float(preprocessing["max_seconds"])
    waves_path, clips_path = Path(data) / PACKED_WAVES, Path(data) / PACKED_CLIPS
    counts = {shard["file"]: shard["count"] for shard in index["shards"]}
    n_samples = counts[PACKED_WAVES]
    try:
        with open(Path(data) / PACKED_UTTERANCES, encoding="utf-8") as f:
            utterances = [json.loads(line) for line in f]
    except (OSError, ValueError) as err:
        raise InputError(f"{Path(data) / PACKED_UTTERANCES}: not readable ({err}); pack it again") from err
    if waves_path.stat().st_size != 4 * n_samples:
        raise InputError(f"{waves_path}: {waves_path.stat().st_size} bytes, index.json expects {4 * n_samples}; "
                         "pack it again")  # fmt: skip
    try:
        where = load_file(str(clips_path))
    except (SafetensorError, OSError) as err:
        raise InputError(f"{clips_path}: not a readable clip table ({err}); pack it again") from err
    if not clip_table_fits(where, len(utterances), counts[PACKED_CLIPS], n_samples):
        raise InputError(
            f"{clips_path}: does not list the {counts[PACKED_CLIPS]} clips index.json holds; pack it again"
        )
    samples = np.memmap(waves_path, dtype=np.float32, mode="r", shape=(n_samples,))
    waves = [samples[a : a + n] for a, n in zip(where["offsets"].tolist(), where["lengths"].tolist(), strict=True)]
    try:
        utterances = [Utterance(u["origin"], Path(u["path"]), u["text"], u.get("language"), u.get("speaker"))
                      for u in utterances]  # fmt: skip
    except (KeyError, TypeError) as err:
        raise InputError(f"{Path(data) / PACKED_UTTERANCES}: a line lacks {err}; pack it again") from err
    problems = [Problem(p["path"], p["reason"]) for p in index["skipped"]]
    log(f"{data}: {index['n_train']:,} + {index['n_val']:,} packed clips, {index['summary']['hours']} hours")
    summary = index["summary"] | {"source": str(data), "packed_from": index["source"]}
    return SpeechClips(
        utterances, waves, problems, alphabet, max_seconds, where["train_index"].tolist(), where["val_index"].tolist(),
        index["summary"]["split"], summary,
    )  # fmt: skip


def clip_table_fits(table: dict[str, torch.Tensor], n_utterances: int, n_clips: int, n_samples: int) -> bool:
    """Whether a pack's clip table places `n_clips` clips inside `n_samples` samples, with a split of them."""
    if set(table) != {"offsets", "lengths", "train_index", "val_index"} or not n_utterances == n_clips:
        return False
    offsets, lengths = table["offsets"], table["lengths"]
    if lengths.shape != (n_clips,) or offsets.shape != (n_clips,) or bool((lengths < 0).any() | (offsets < 0).any()):
        return False
    if n_clips and int((offsets + lengths).max()) > n_samples:
        return False
    split = torch.cat([table["train_index"], table["val_index"]])
    return len(split) == 0 or (int(split.min()) >= 0 and int(split.max()) < n_clips)


def find_speech_manifest(data: Path) -> Path | None:
    """DATA itself when it is a CSV with `path` and `text` columns, or the folder's manifest.csv / metadata.csv.
    A pack is refused: where this is asked, raw files are read."""
    import csv

    from layerwise.data.shards import refuse_pack

    refuse_pack(data)
    candidates = [data] if data.is_file() else [data / "manifest.csv", data / "metadata.csv"]
    for candidate in candidates:
        if candidate.is_file() and candidate.suffix.lower() == ".csv":
            try:
                with candidate.open(newline="", encoding="utf-8-sig") as file:
                    header = {name.strip().lower() for name in next(csv.reader(file), [])}
            except (OSError, UnicodeDecodeError):
                continue
            if {"path", "text"} <= header or {"file_name", "transcription"} <= header:
                return candidate
    return None


def load_clips(
    manifest: Path, max_seconds: float | None, keep: Callable[[np.ndarray], Any] = lambda wave: wave
) -> tuple[list[tuple[Utterance, Any]], list[Problem], dict]:
    """Read the manifest and every clip; clips far longer than the rest (or than `max_seconds`) are refused.

    Each clip is decoded in turn and `keep(wave)` is what is kept of it: the wave itself, or, for a pack, where
    it was written (so that packing holds one clip at a time). info["samples"]: the accepted clips' length."""
    from layerwise.data.speech import choose_max_seconds, load_utterances, read_speech_manifest

    utterances, problems, info = read_speech_manifest(manifest)
    decoded = []  # (utterance, what is kept of its wave, its samples)
    for utterance in utterances:
        waves, _, failed = load_utterances([utterance], None)  # one at a time: `keep` may write it out
        problems += failed
        if waves:
            decoded.append((utterance, keep(waves[0]), len(waves[0])))
    limit = max_seconds or choose_max_seconds([n / SAMPLE_RATE for *_, n in decoded]) if decoded else 0.0
    clips, info["samples"] = [], 0
    for utterance, wave, n_samples in decoded:
        seconds = n_samples / SAMPLE_RATE
        if seconds > limit:
            reason = (f"{seconds:.1f} s long, far longer than the rest (the model takes clips up to {limit:.1f} s); "
                      "`transcribe` cuts long recordings at silences")  # fmt: skip
            problems.append(Problem(utterance.origin, reason))
        else:
            clips.append((utterance, wave))
            info["samples"] += n_samples
    info["max_seconds"] = limit
    return clips, problems, info


def split_clips(utterances: list[Utterance], val_fraction: float, seed: int) -> tuple[list[int], list[int], str]:
    """Hold out whole speakers when every clip names one (and there are at least 2), else random clips."""
    rng = np.random.default_rng(seed)
    speakers = [u.speaker for u in utterances]
    if all(speakers) and len(set(speakers)) >= 2:
        names = sorted(set(speakers))
        counts = Counter(speakers)
        held: set[str] = set()
        for name in (names[i] for i in rng.permutation(len(names))):
            if sum(counts[s] for s in held) >= val_fraction * len(utterances) or len(held) == len(names) - 1:
                break
            held.add(name)
        val = [i for i, s in enumerate(speakers) if s in held]
        train = [i for i, s in enumerate(speakers) if s not in held]
        return train, val, f"by speaker: {len(held)} of {len(names)} speakers held out, none heard in training"
    order = rng.permutation(len(utterances)).tolist()
    n_val = max(1, round(val_fraction * len(utterances)))
    return sorted(order[n_val:]), sorted(order[:n_val]), "random clips (the manifest names no speakers)"


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus WER and CER with torchmetrics (errors summed over clips, divided by the reference length)."""
    from torchmetrics.functional.text import char_error_rate, word_error_rate

    return {
        "wer": float(word_error_rate(hypotheses, references)),
        "cer": float(char_error_rate(hypotheses, references)),
    }


def language_accuracy(true: list[int], predicted: list[int]) -> float | None:
    known = [(t, p) for t, p in zip(true, predicted, strict=True) if t >= 0]
    return float(np.mean([t == p for t, p in known])) if known else None


def english_baseline(clips: list[tuple[np.ndarray, str]], network_hypotheses: list[str], has_languages: bool) -> dict:
    """PocketSphinx's WER on the English clips, beside the network's on the same clips."""
    from layerwise.tasks.speech_baseline import pocketsphinx_wer

    name = "pocketsphinx (CMU Sphinx, en-us)"
    if not clips:
        note = "no English clips in this data" if has_languages else "the manifest names no languages"
        return {"model": name, "wer": None, "note": note}
    result, reason = pocketsphinx_wer(clips)
    if result is None:
        return {"model": name, "wer": None, "note": reason}
    return result | {"network_wer": error_rates([text for _, text in clips], network_hypotheses)["wer"]}
