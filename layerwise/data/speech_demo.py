"""The transcribe demo's data: synthetic speech in five languages, and real telephone prompts to test on.

Training clips are synthesised offline with espeak-ng (every language voice of en/es/fr/it/de × its
voice variants, random speed and pitch per clip) and, for English, flite's voices. The sentences are
the transcripts of Asterisk's recorded telephone prompts (`asterisk-core-sounds-*`, ≤ 12 words), a
few dozen German phrases written here (Asterisk has no German set), and numbers read as words.

Two test sets measure two kinds of generalisation:
- synthetic test: held-out voice variants (never heard in any language) saying held-out sentences;
- human test: the Asterisk recordings themselves (one professional speaker per language, 8 kHz
  telephone audio resampled to 16 kHz). Their sentences are the same prompt texts the synthetic
  pool draws from, so most of them were also *said* (by a synthesiser) in training:
  `info["human_text_in_train"]` counts them. This set measures the jump from synthetic to human
  voices, not unseen text.

Manifests are CSV files (path,text,language,speaker) with paths relative to the manifest, read by
the same `data/sources.py` path as a user's own manifest. Texts are normalised (`normalise_text`):
lower case, no punctuation, numbers written as words.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from scipy.signal import resample_poly

from layerwise.data.datasets import MARKER_NAME, DatasetUnavailable, _build_folder, _is_complete

SPEECH_LANGUAGES = ("en", "es", "fr", "it", "de")
SAMPLE_RATE = 16_000  # Hz, every clip is written at this rate, mono 16-bit FLAC
FORMAT_VERSION = 1  # bump when the files written for the same arguments change

ASTERISK_SOUNDS = Path("/usr/share/asterisk/sounds")  # <lang> -> /etc/alternatives -> e.g. en_US_f_Allison
ASTERISK_TRANSCRIPTS = "/usr/share/doc/asterisk-core-sounds-{lang}/core-sounds-{lang}.txt.gz"
ASTERISK_LANGUAGES = ("en", "es", "fr", "it")
MAX_WORDS = 12  # longer prompts (conference menus) are minutes of audio for one sentence

TEST_SENTENCE_FRACTION = 0.15  # of each language's distinct sentences, never said in training
TEST_VOICE_FRACTION = 0.2  # of voice variants (and flite voices), never heard in training
TEST_CLIP_FRACTION = 0.15  # of clips_per_language that go to the synthetic test
PROMPT_SHARE = 0.6  # of clips that say a sentence; the rest say a number
NUMBER_TEXTS = 400  # distinct number texts drawn per language before the train/test split
DIGITS_RANGE = (3, 6)  # a digit string: "four seven one" ...
NUMBER_RANGE = (0, 9999)  # ... or a whole number: "four hundred and seventy one"

SPEED_WPM = (130, 210)  # espeak-ng -s; its default is 175
PITCH = (30, 70)  # espeak-ng -p, on its 0..99 scale
FLITE_VOICES = ("kal16", "awb", "rms", "slt")  # 16 kHz voices; plain "kal" is 8 kHz and awb_time says only times
FLITE_SPEED_REFERENCE = 170  # wpm that maps to flite's duration_stretch=1
WORKERS = 2  # synthesis processes at once: each clip is one short-lived espeak-ng/flite process
TIMEOUT_S = 60

# Variants that are not a plausible human voice (whispers, robots, effects) or a test setting.
EXCLUDED_VARIANTS = frozenset(
    {"whisper", "whisperf", "Demonic", "Tweaky", "UniRobot", "anikaRobot", "croak", "fast", "Storm"}
)
FALLBACK_VARIANTS = (*(f"m{i}" for i in range(1, 8)), *(f"f{i}" for i in range(1, 5)))

DIGIT_WORDS = {
    "en": "zero one two three four five six seven eight nine".split(),
    "es": "cero uno dos tres cuatro cinco seis siete ocho nueve".split(),
    "fr": "zéro un deux trois quatre cinq six sept huit neuf".split(),
    "it": "zero uno due tre quattro cinque sei sette otto nove".split(),
    "de": "null eins zwei drei vier fünf sechs sieben acht neun".split(),
}

# Written for this demo: everyday and telephone-menu phrases, in the register of the Asterisk prompts.
GERMAN_SENTENCES = (
    "Guten Morgen",
    "Guten Tag",
    "Guten Abend",
    "Auf Wiederhören",
    "Vielen Dank für Ihren Anruf",
    "Bitte warten Sie",
    "Einen Moment bitte",
    "Bitte bleiben Sie am Apparat",
    "Alle Leitungen sind besetzt",
    "Bitte versuchen Sie es später noch einmal",
    "Bitte geben Sie Ihre Kundennummer ein",
    "Bitte geben Sie Ihr Passwort ein",
    "Bitte drücken Sie die Rautetaste",
    "Bitte drücken Sie die Sterntaste",
    "Ihre Eingabe war leider falsch",
    "Das Passwort ist ungültig",
    "Sie haben eine neue Nachricht",
    "Sie haben keine neuen Nachrichten",
    "Die Nachricht wurde gelöscht",
    "Die Nachricht wurde gespeichert",
    "Bitte sprechen Sie nach dem Signalton",
    "Zum Beenden legen Sie einfach auf",
    "Sie werden jetzt verbunden",
    "Der Teilnehmer ist zurzeit nicht erreichbar",
    "Die gewählte Rufnummer ist nicht vergeben",
    "Ihr Anruf wird weitergeleitet",
    "Unser Büro ist derzeit geschlossen",
    "Unsere Öffnungszeiten sind Montag bis Freitag",
    "Für Deutsch drücken Sie bitte die Eins",
    "Für den Kundendienst drücken Sie die Zwei",
    "Zurück zum Hauptmenü",
    "Bitte wiederholen Sie Ihre Eingabe",
    "Die Konferenz beginnt gleich",
    "Sie sind jetzt stummgeschaltet",
    "Das Mikrofon ist wieder eingeschaltet",
    "Ein weiterer Teilnehmer ist beigetreten",
    "Ein Teilnehmer hat die Konferenz verlassen",
    "Sie sind der einzige Teilnehmer",
    "Bitte nennen Sie Ihren Namen",
    "Die Uhrzeit ist",
    "Das Datum ist",
    "Heute ist ein schöner Tag",
    "Wie geht es Ihnen",
    "Mir geht es gut",
    "Ich habe eine Frage",
    "Können Sie das bitte wiederholen",
    "Sprechen Sie bitte langsamer",
    "Das Wetter ist heute schlecht",
    "Der Zug hat Verspätung",
    "Wo ist der Bahnhof",
    "Ich möchte einen Termin vereinbaren",
    "Der Termin wurde bestätigt",
    "Ihre Bestellung ist unterwegs",
    "Ihr Paket wurde zugestellt",
    "Das Konto wurde gesperrt",
    "Bitte rufen Sie morgen wieder an",
    "Wir sind gleich für Sie da",
    "Haben Sie noch weitere Fragen",
    "Vielen Dank und einen schönen Tag",
    "Bis bald",
)


@dataclass(frozen=True)
class SpeechDemo:
    """The prepared demo: three CSV manifests (path,text,language,speaker) and what went into them."""

    train_manifest: Path
    synthetic_test_manifest: Path
    human_test_manifest: Path
    info: dict[str, Any]


@dataclass(frozen=True)
class _Clip:
    """One output file: synthesised (engine espeak-ng/flite) or converted from a recording (engine copy)."""

    path: str  # relative to the demo folder
    text: str
    language: str
    speaker: str  # espeak "voice+variant", "flite:<voice>", or the Asterisk prompt set
    engine: str
    speed: int = 0
    pitch: int = 0
    source: str = ""  # the recording, for engine "copy"


def prepare_speech_demo(
    cache: Path, clips_per_language: int = 600, seed: int = 0, *, human_per_language: int | None = None
) -> SpeechDemo:
    """Synthesise (or reuse) the demo under `cache`; a second call with the same arguments returns at once.

    `clips_per_language` synthetic clips per language, TEST_CLIP_FRACTION of them (at least one) in
    the synthetic test. The human test holds every usable Asterisk prompt, or a seeded sample of
    `human_per_language` of them (for quick tests). Raises DatasetUnavailable without espeak-ng or
    the Asterisk transcripts.
    """
    if clips_per_language < 2:
        raise ValueError(f"clips_per_language must be at least 2 (one train, one test clip), got {clips_per_language}")
    if human_per_language is not None and human_per_language < 1:
        raise ValueError(f"human_per_language must be a positive number or None (all), got {human_per_language}")
    name = f"speech-demo-n{clips_per_language}-seed{seed}" + (
        f"-human{human_per_language}" if human_per_language else ""
    )
    root = Path(cache) / name
    identity = {
        "dataset": "speech-demo",
        "format_version": FORMAT_VERSION,
        "clips": clips_per_language,
        "seed": seed,
        "human_per_language": human_per_language,
    }
    if not _is_complete(root, identity):
        _check_tools()
        clips, info = _plan(clips_per_language, seed, human_per_language)
        _build_folder(root, identity, lambda staging: {"info": _write(staging, clips, info)})
    info = json.loads((root / MARKER_NAME).read_text(encoding="utf-8"))["info"]
    return SpeechDemo(root / "train.csv", root / "synthetic_test.csv", root / "human_test.csv", info)


def normalise_text(text: str) -> str | None:
    """Lower-case words separated by single spaces; None when nothing speakable is left.

    `[...]` and `(...)` are non-speech notes and are dropped, as are quotes, ellipses and punctuation;
    hyphens separate words. Text with digits or other symbols is None: how it is read is unknown.
    """
    text = text.replace("\ufeff", "").replace("’", "'").replace("…", " ")
    text = _drop_between(_drop_between(text, "[", "]"), "(", ")")
    for mark in '"“”«»„.,;:!?¿¡-–—/':
        text = text.replace(mark, " ")
    words = [w.strip("'") for w in text.lower().split()]
    words = [w for w in words if w]
    if not words or not all(c.isalpha() or c == "'" for w in words for c in w):
        return None
    return " ".join(words)


def read_asterisk_prompts(language: str) -> list[tuple[Path, str]]:
    """(recording, normalised transcript) of a language's prompts that are speech of 1..MAX_WORDS words.

    The recording may be missing (the -wav package not installed); callers check.
    """
    listing = Path(ASTERISK_TRANSCRIPTS.format(lang=language))
    prompts = []
    for line in gzip.open(listing, "rt", encoding="utf-8", errors="replace"):
        line = line.strip().lstrip("\ufeff")
        if not line or line.startswith(";") or ": " not in line:
            continue
        name, transcript = line.split(": ", 1)
        text = normalise_text(transcript)
        if text is not None and len(text.split()) <= MAX_WORDS:
            prompts.append((ASTERISK_SOUNDS / language / f"{name.strip()}.wav", text))
    return prompts


def number_text(language: str, rng: random.Random) -> str:
    """A number as the words that are spoken: a digit string or (with num2words) a whole number."""
    try:
        from num2words import num2words
    except ImportError:
        num2words = None
    if num2words is None or rng.random() < 0.5:
        digits = rng.randint(*DIGITS_RANGE)
        return " ".join(DIGIT_WORDS[language][rng.randrange(10)] for _ in range(digits))
    number = int(10 ** rng.uniform(0, np.log10(NUMBER_RANGE[1] + 1))) - 1  # as many 2-digit as 4-digit numbers
    text = normalise_text(num2words(max(number, NUMBER_RANGE[0]), lang=language))
    assert text is not None, number
    return text


def _drop_between(text: str, open_: str, close: str) -> str:
    while open_ in text:
        start = text.index(open_)
        end = text.find(close, start)
        text = text[:start] + " " + (text[end + 1 :] if end >= 0 else "")
    return text


def _check_tools() -> None:
    if shutil.which("espeak-ng") is None:
        raise DatasetUnavailable(
            "the speech demo needs espeak-ng: run scripts/setup.sh (sudo apt-get install espeak-ng)"
        )
    missing = [lang for lang in ASTERISK_LANGUAGES if not Path(ASTERISK_TRANSCRIPTS.format(lang=lang)).is_file()]
    if missing:
        packages = " ".join(f"asterisk-core-sounds-{lang} asterisk-core-sounds-{lang}-wav" for lang in missing)
        raise DatasetUnavailable(f"the speech demo needs the Asterisk prompts: sudo apt-get install {packages}")


def _espeak_voices(language: str) -> list[str]:
    """espeak-ng's voices for a language: en -> en-029, en-gb, en-gb-scotland, ..., en-us-nyc."""
    listing = subprocess.run(["espeak-ng", "--voices"], capture_output=True, text=True, check=True).stdout
    codes = [line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) > 1]
    return sorted(c for c in codes if c == language or c.startswith(f"{language}-"))


def _espeak_variants() -> list[str]:
    """Variant names (`+name`) from espeak-ng's data folder, less EXCLUDED_VARIANTS."""
    version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
    folder = Path(version.split("Data at:")[-1].strip()) / "voices" / "!v" if "Data at:" in version else None
    if folder is None or not folder.is_dir():
        return list(FALLBACK_VARIANTS)
    names = [p.name for p in folder.iterdir() if p.is_file() and " " not in p.name]
    return sorted(n for n in names if n not in EXCLUDED_VARIANTS and not n.startswith("robosoft"))


def _split(items: list[str], fraction: float, rng: random.Random) -> tuple[list[str], list[str]]:
    """(kept, held out): round(fraction * n) of the items, at least one, drawn by `rng`."""
    items = sorted(items)
    held = set(rng.sample(items, max(1, round(fraction * len(items))))) if len(items) > 1 else set()
    return [i for i in items if i not in held], [i for i in items if i in held]


def _plan(
    clips_per_language: int, seed: int, human_per_language: int | None = None
) -> tuple[list[_Clip], dict[str, Any]]:
    """Every clip to write, and the info dict (voices, sentence counts) describing the plan."""
    rng = random.Random(f"speech-demo/{seed}/voices")
    # One draw of held-out variants for all languages: a test voice is not heard in any language.
    train_variants, test_variants = _split(_espeak_variants(), TEST_VOICE_FRACTION, rng)
    flite = list(FLITE_VOICES) if shutil.which("flite") else []
    train_flite, test_flite = _split(flite, TEST_VOICE_FRACTION, rng)
    n_test = max(1, round(TEST_CLIP_FRACTION * clips_per_language))
    clips: list[_Clip] = []
    info: dict[str, Any] = {"languages": list(SPEECH_LANGUAGES), "sample_rate": SAMPLE_RATE, "voices": {}}
    info["held_out_variants"] = test_variants
    info["notes"] = {"de": "no Asterisk recordings exist for German: no human test, sentences written for the demo"}
    if not flite:
        info["notes"]["en"] = "flite is not installed: English uses espeak-ng voices only"
    info["sentences"], info["human_text_in_train"], info["missing_recordings"] = {}, {}, {}
    for language in SPEECH_LANGUAGES:
        lang_rng = random.Random(f"speech-demo/{seed}/{language}")
        prompts = read_asterisk_prompts(language) if language in ASTERISK_LANGUAGES else []
        sentences = sorted({t for _, t in prompts} or {normalise_text(s) for s in GERMAN_SENTENCES})
        numbers = sorted({number_text(language, lang_rng) for _ in range(NUMBER_TEXTS)} - set(sentences))
        train_sentences, test_sentences = _split(sentences, TEST_SENTENCE_FRACTION, lang_rng)
        train_numbers, test_numbers = _split(numbers, TEST_SENTENCE_FRACTION, lang_rng)
        voices = _espeak_voices(language)
        english = language == "en"  # flite's voices speak English only
        train_speakers = [f"{v}+{x}" for v in voices for x in train_variants]
        test_speakers = [f"{v}+{x}" for v in voices for x in test_variants]
        for split, count, pools, espeak, flite_voices in (
            ("train", clips_per_language - n_test, (train_sentences, train_numbers), train_speakers, train_flite),
            ("synthetic_test", n_test, (test_sentences, test_numbers), test_speakers, test_flite),
        ):
            flite_voices = flite_voices if english else []
            clips += _draw_clips(f"audio/{split}/{language}", language, count, pools, espeak, flite_voices, lang_rng)
        recorded = [(wav, text) for wav, text in prompts if wav.is_file()]
        missing = len(prompts) - len(recorded)
        if human_per_language is not None and human_per_language < len(recorded):
            recorded = lang_rng.sample(recorded, human_per_language)
        speaker = f"asterisk:{(ASTERISK_SOUNDS / language).resolve().name}"  # en -> en_US_f_Allison
        for i, (wav, text) in enumerate(recorded):
            path = f"audio/human_test/{language}/{i:05d}.flac"
            clips.append(_Clip(path, text, language, speaker, "copy", source=str(wav)))
        info["voices"][language] = {
            "train": train_speakers + [f"flite:{f}" for f in train_flite if english],
            "test": test_speakers + [f"flite:{f}" for f in test_flite if english],
        }
        info["sentences"][language] = {
            "train": len(train_sentences) + len(train_numbers),
            "test": len(test_sentences) + len(test_numbers),
        }
        if language in ASTERISK_LANGUAGES:
            info["human_text_in_train"][language] = sum(text in set(train_sentences) for _, text in recorded)
            info["missing_recordings"][language] = missing
    return clips, info


def _draw_clips(
    folder: str,
    language: str,
    count: int,
    pools: tuple[list[str], list[str]],
    espeak: list[str],
    flite: list[str],
    rng: random.Random,
) -> list[_Clip]:
    """`count` clips: a sentence (PROMPT_SHARE of them) or a number from `pools`, a random speaker and setting."""
    accents = len({s.split("+")[0] for s in espeak})
    clips = []
    for i in range(count):
        pool = pools[0] if rng.random() < PROMPT_SHARE else pools[1]
        # flite counts as one more accent next to espeak-ng's, so it is not drowned by their many variants
        use_flite = bool(flite) and rng.random() < 1 / (accents + 1)
        clips.append(
            _Clip(
                path=f"{folder}/{i:05d}.flac",
                text=rng.choice(pool),
                language=language,
                speaker=f"flite:{rng.choice(flite)}" if use_flite else rng.choice(espeak),
                engine="flite" if use_flite else "espeak-ng",
                speed=rng.randint(*SPEED_WPM),
                pitch=rng.randint(*PITCH),
            )
        )
    return clips


def _write(staging: Path, clips: list[_Clip], info: dict[str, Any]) -> dict[str, Any]:
    """Render every clip under `staging`, write the manifests; the info dict with counts and timing."""
    for folder in {Path(c.path).parent for c in clips}:
        (staging / folder).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:  # threads: the work is in the child processes and numpy
        for _ in pool.map(lambda clip: _render(clip, staging), clips):
            pass  # iterate to re-raise the first failure here
    info["seconds"] = round(time.perf_counter() - start, 1)
    info["counts"] = {}
    for split in ("train", "synthetic_test", "human_test"):
        rows = [c for c in clips if c.path.startswith(f"audio/{split}/")]
        with open(staging / f"{split}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "text", "language", "speaker"])
            writer.writerows([c.path, c.text, c.language, c.speaker] for c in rows)
        info["counts"][split] = {lang: sum(c.language == lang for c in rows) for lang in SPEECH_LANGUAGES}
    info["megabytes"] = round(sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) / 2**20, 1)
    return info


def _render(clip: _Clip, staging: Path) -> None:
    """Write one clip as 16 kHz mono 16-bit FLAC."""
    if clip.engine == "copy":
        wave, rate = soundfile.read(clip.source, dtype="float32", always_2d=True)
    elif clip.engine == "espeak-ng":
        command = ["espeak-ng", "--stdout", "-v", clip.speaker, "-s", str(clip.speed), "-p", str(clip.pitch)]
        # The text goes on stdin so it can never be read as an option.
        wave, rate = soundfile.read(io.BytesIO(_run(command, clip.text.encode())), dtype="float32", always_2d=True)
    else:
        wave, rate = _flite(clip, staging)
    wave = wave.mean(axis=1)  # (T, C) -> (T,)
    ratio = Fraction(SAMPLE_RATE, rate)
    if ratio != 1:
        wave = resample_poly(wave, ratio.numerator, ratio.denominator)
    soundfile.write(staging / clip.path, np.clip(wave, -1, 1), SAMPLE_RATE, subtype="PCM_16", format="FLAC")


def _flite(clip: _Clip, staging: Path) -> tuple[np.ndarray, int]:
    """flite writes only to a file: (T, 1) float32 samples and their rate, via a scratch folder."""
    voice = clip.speaker.removeprefix("flite:")
    stretch = f"duration_stretch={FLITE_SPEED_REFERENCE / clip.speed:.3f}"  # slower speech lasts longer
    with tempfile.TemporaryDirectory(dir=staging) as tmp:
        text_file, wav = Path(tmp) / "text.txt", Path(tmp) / "out.wav"
        text_file.write_text(clip.text, encoding="utf-8")
        _run(["flite", "-voice", voice, "--setf", stretch, "-f", str(text_file), "-o", str(wav)])
        return soundfile.read(wav, dtype="float32", always_2d=True)


def _run(command: list[str], stdin: bytes | None = None) -> bytes:
    result = subprocess.run(command, input=stdin, capture_output=True, timeout=TIMEOUT_S)
    if result.returncode != 0 or (stdin is not None and not result.stdout):
        stderr = result.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"{' '.join(command)} failed (exit {result.returncode}): {stderr}")
    return result.stdout
