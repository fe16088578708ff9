"""How well does one multilingual recogniser do after a fixed CPU budget, and which head should be the default?

Trains (cached under .cache/bench/transcribe-<model>) the CTC model (speech_xs) and the encoder-decoder
with a CTC auxiliary loss (speech_xs_decoder) on the demo's espeak-ng clips in five languages, each for
--budget seconds (default 600 s on 2 CPU cores), then prints per model and per language WER and CER on
(a) voices and sentences never heard in training and (b) Debian's asterisk human telephone prompts
(8 kHz), with PocketSphinx's WER on the English prompts beside the network's. Also prints the real-time
factor of `transcribe` (seconds of compute per second of audio, 2 CPU cores; target <= 0.05) and
beam 4 against greedy decoding.

    .venv/bin/python benchmarks/transcribe.py [--budget 600] [--models speech_xs,speech_xs_decoder] [--retrain]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import layerwise
from layerwise.api import fit
from layerwise.data.speech_demo import prepare_speech_demo
from layerwise.demo import default_cache


def table(title: str, metrics: dict) -> None:
    print(f"  {title}: WER {metrics['wer']:.1%}  CER {metrics['cer']:.1%}  ({metrics['n_clips']} clips, "
          f"language accuracy {metrics.get('language_accuracy') or 0:.1%}, real-time factor "
          f"{metrics['real_time_factor']:.3f})")  # fmt: skip
    for code, part in metrics.get("per_language", {}).items():
        print(f"    {code}: WER {part['wer']:6.1%}  CER {part['cer']:6.1%}  language acc "
              f"{part['language_accuracy'] or 0:6.1%}  ({part['n']} clips)")  # fmt: skip
    baseline = metrics.get("baseline", {})
    if baseline.get("wer") is not None:
        print(f"    English: {baseline['model']} WER {baseline['wer']:.1%} vs the network's "
              f"{baseline['network_wer']:.1%} on the same {baseline['n']} clips")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per model")
    parser.add_argument("--models", default="speech_xs,speech_xs_decoder")
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    demo = prepare_speech_demo(default_cache() / "speech")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; training budget {args.budget:.0f} s per model"
    )
    for name in args.models.split(","):
        run = Path(f".cache/bench/transcribe-{name}")
        if args.retrain or not (run / "metrics.json").is_file():
            shutil.rmtree(run, ignore_errors=True)
            fit(demo.train_manifest, run, task="transcribe", model=name, epochs=1000, time_budget=args.budget,
                show_progress=False)  # fmt: skip
        summary = json.loads((run / "metrics.json").read_text())
        model = layerwise.load(run)
        print(f"\n{name} ({summary['parameters']:,} parameters): {summary['train_seconds']} s, "
              f"{summary['steps']} steps, "
              f"{summary['epochs_run']} epochs")  # fmt: skip
        table("validation (held-out voices)", summary["metrics"])
        synthetic, _ = model.evaluate(demo.synthetic_test_manifest)
        table("test: held-out voices and sentences", synthetic)
        human, _ = model.evaluate(demo.human_test_manifest)
        table("test: human telephone prompts (asterisk)", human)
        clips = sorted(Path(demo.synthetic_test_manifest).parent.rglob("*.wav"))[:40] or sorted(
            Path(demo.synthetic_test_manifest).parent.rglob("*.flac"))[:40]  # fmt: skip
        for beam in (1, 4):
            started = time.perf_counter()
            results, _ = model.predict(clips, beam_size=beam)
            seconds = sum(r.seconds_of_audio for r in results)
            print(f"  transcribe, beam {beam}: real-time factor {(time.perf_counter() - started) / seconds:.3f} "
                  f"({seconds:.0f} s of audio)")  # fmt: skip


if __name__ == "__main__":
    main()
