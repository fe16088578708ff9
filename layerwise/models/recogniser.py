"""A Whisper-shaped speech recogniser at small scale, and its decoding (greedy, beam, CTC prefix beam search).

Log-mel features (B, n_mels, T) at 10 ms frames go through a conv stem that downsamples 4x (40 ms frames), a
pre-norm transformer encoder, and up to three heads:
- CTC over characters (id 0 is the blank), always present;
- the clip's language, from a masked mean over frames (absent when n_languages == 0);
- optionally an autoregressive transformer decoder with cross-attention over the encoder output, prompted as in
  Whisper with [sot, language, transcribe] (or [sot, transcribe] without languages), then characters, then eot.

Decoding has one typed extension point, `StepLogProbs`: a function from the tokens so far to next-token
log-probabilities. `greedy_search` and `beam_search` work on any such function; `transcribe` builds one from the
model's decoder. CTC-only models decode by best path (beam_size 1) or `ctc_prefix_beam_search`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layerwise.errors import InputError
from layerwise.models.registry import register_model

BLANK_ID = 0  # CTC blank; also the padding value of (B, S) target tensors
FRAME_MS = 10  # input feature hop
DOWNSAMPLING = 4  # two stride-2 convolutions: 10 ms frames -> 40 ms encoder frames
MAX_FRAMES = 30_000 // (FRAME_MS * DOWNSAMPLING)  # 30 s of audio, Whisper's window: 750 encoder frames
MAX_TEXT_TOKENS = 512  # characters per transcript; 30 s of speech is ~15 characters/s, so ~450 at most
POSITION_BASE = 10_000.0  # sinusoid wavelengths run geometrically from 2*pi to 2*pi*base, as in Vaswani et al.
CONV_KERNEL = 15  # encoder convolution: 15 frames of 40 ms, about a syllable either side
INIT_STD = 0.02  # token and learned-position embeddings

# Hybrid CTC/attention training (Watanabe et al. 2017, ESPnet's default weights): CTC's monotonic alignment keeps
# the encoder's frames aligned with the text and speeds up the decoder's convergence, while the decoder, which sees
# the whole prefix, does the transcribing. A CTC-only model uses CTC alone (weight 1).
CTC_WEIGHT = 0.3
DECODER_WEIGHT = 0.7
LANGUAGE_WEIGHT = 0.5  # an auxiliary clip-level task: kept below the transcription losses
UNKNOWN_LANGUAGE = -1  # value in the `languages` tensor for clips without a language label


@dataclass(frozen=True)
class RecogniserConfig:
    n_mels: int
    vocab_size: int  # characters plus the blank (id 0)
    n_languages: int  # 0: no language head and no language token in the decoder prompt
    dim: int
    depth: int  # encoder blocks
    heads: int
    decoder_depth: int = 0  # 0: CTC only
    dropout: float = 0.1
    max_frames: int = MAX_FRAMES  # encoder frames, after downsampling
    max_text_tokens: int = MAX_TEXT_TOKENS  # characters per transcript, excluding prompt and eot

    def __post_init__(self) -> None:
        if self.dim % self.heads or self.dim % 2:
            raise InputError(f"RecogniserConfig: dim {self.dim} must be even and a multiple of heads {self.heads}")
        if self.vocab_size < 2:
            raise InputError(f"RecogniserConfig: vocab_size {self.vocab_size} must count the blank and >= 1 character")
        if self.n_mels < 1 or self.depth < 1 or self.max_frames < 1 or self.max_text_tokens < 1:
            raise InputError("RecogniserConfig: n_mels, depth, max_frames and max_text_tokens must be at least 1")
        if self.n_languages < 0 or self.decoder_depth < 0:
            raise InputError("RecogniserConfig: n_languages and decoder_depth must be 0 or more")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"RecogniserConfig: dropout {self.dropout} must be in [0, 1)")


def downsampled_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Valid frames after the stem: each Conv1d(kernel 3, stride 2, padding 1) maps L to floor((L - 1) / 2) + 1."""
    for _ in range(2):
        lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
    return lengths


def frame_padding(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """(B,) valid lengths -> (B, frames) bool, True at padding (PyTorch's key_padding_mask convention)."""
    return torch.arange(frames, device=lengths.device) >= lengths[:, None]


def sinusoids(length: int, dim: int) -> torch.Tensor:
    """Fixed positions (length, dim): sines in the first half of the channels, cosines in the second."""
    inv_freq = POSITION_BASE ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq  # (length, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


class ConvStem(nn.Module):
    """(B, n_mels, T) -> (B, T', dim), T' = downsampled_lengths(T); frames past each clip's length are zeroed
    before each convolution, so padding in a batch reads exactly like the convolution's own zero padding."""

    def __init__(self, n_mels: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, dim, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.act = nn.GELU()

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = features.masked_fill(frame_padding(lengths, features.shape[2])[:, None], 0.0)  # (B, n_mels, T)
        x = self.act(self.conv1(x))  # (B, dim, ceil(T/2))
        half = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
        x = x.masked_fill(frame_padding(half, x.shape[2])[:, None], 0.0)
        x = self.act(self.conv2(x))  # (B, dim, T')
        return x.transpose(1, 2), downsampled_lengths(lengths)  # (B, dim, T') -> (B, T', dim)


class ConformerBlock(nn.Module):
    """Pre-norm self-attention, a depthwise-convolution module and a feed-forward, each residual (Gulati et al.,
    2020, without the macaron split). Why not a plain transformer block: on 2 CPU cores the plain encoder sat on
    CTC's all-blank plateau for ~400 steps; the convolution gives every frame its neighbours from the first step.
    (B, T, D) -> (B, T, D); padding frames are zeroed before the convolution so they never leak into a clip."""

    def __init__(self, dim: int, heads: int, dropout: float, kernel_size: int = CONV_KERNEL) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.conv_norm = nn.LayerNorm(dim)
        self.conv_in = nn.Linear(dim, 2 * dim)  # GLU halves it again
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv_out = nn.Linear(dim, dim)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.attention_norm(x)
        x = x + self.dropout(self.attention(h, h, h, key_padding_mask=padding, need_weights=False)[0])
        h = F.glu(self.conv_in(self.conv_norm(x)), dim=-1).masked_fill(padding[..., None], 0.0)  # (B, T, D)
        h = self.depthwise(h.transpose(1, 2)).transpose(1, 2)  # (B, T, D) -> (B, D, T) -> (B, T, D)
        x = x + self.dropout(self.conv_out(F.silu(h)))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class AudioEncoder(nn.Module):
    """Conv stem, sinusoidal positions, Conformer-style blocks: (B, n_mels, T) -> (B, T', dim)."""

    def __init__(self, n_mels: int, dim: int, depth: int, heads: int, dropout: float, max_frames: int) -> None:
        super().__init__()
        self.max_frames = max_frames
        self.stem = ConvStem(n_mels, dim)
        self.register_buffer("positions", sinusoids(max_frames, dim), persistent=False)  # (max_frames, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(ConformerBlock(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, enc_lengths = self.stem(features, lengths)  # (B, T', D), (B,)
        frames = x.shape[1]
        if frames > self.max_frames:
            raise InputError(
                f"recogniser: {features.shape[2]} input frames give {frames} encoder frames, over max_frames "
                f"{self.max_frames} ({self.max_frames * FRAME_MS * DOWNSAMPLING / 1000:g} s); split the audio"
            )
        padding = frame_padding(enc_lengths, frames)  # (B, T')
        x = self.dropout(x + self.positions[:frames])
        for block in self.blocks:
            x = block(x, padding)
        return self.norm(x).masked_fill(padding[..., None], 0.0), enc_lengths  # zero at padding


class TextDecoder(nn.Module):
    """Causal pre-norm transformer over tokens (B, L) with cross-attention to the encoder -> logits (B, L, vocab)."""

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, dropout: float, context_len: int) -> None:
        super().__init__()
        self.context_len = context_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.empty(context_len, dim))  # learned, as in Whisper's decoder
        nn.init.normal_(self.embed.weight, std=INIT_STD)
        nn.init.normal_(self.positions, std=INIT_STD)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerDecoderLayer(
                dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, encoded: torch.Tensor, enc_padding: torch.Tensor) -> torch.Tensor:
        """tokens (B, L), encoded (B, T', D), enc_padding (B, T') True at padding -> logits (B, L, vocab)."""
        length = tokens.shape[1]
        if length > self.context_len:
            raise InputError(f"recogniser decoder: {length} tokens exceed its context of {self.context_len}")
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu(1)  # True: may not attend
        x = self.dropout(self.embed(tokens) + self.positions[:length])  # (B, L, D)
        for block in self.blocks:
            x = block(x, encoded, tgt_mask=causal, memory_key_padding_mask=enc_padding, tgt_is_causal=True)
        return self.norm(x) @ self.embed.weight.T  # output tied to the token embedding, as in Whisper


class SpeechRecogniser(nn.Module):
    """Log-mel features (B, n_mels, T) and valid lengths (B,) -> CTC log-probs over characters, language logits,
    and (with a decoder) next-token logits for teacher-forced or autoregressive transcription."""

    def __init__(self, config: RecogniserConfig) -> None:
        super().__init__()
        self.config = config
        self.num_features = config.dim
        self.encoder = AudioEncoder(
            config.n_mels, config.dim, config.depth, config.heads, config.dropout, config.max_frames
        )
        self.ctc_head = nn.Linear(config.dim, config.vocab_size)
        self.language_head = nn.Linear(config.dim, config.n_languages) if config.n_languages else None
        self.decoder = None
        if config.decoder_depth:
            self.decoder = TextDecoder(
                self.decoder_vocab_size,
                config.dim,
                config.decoder_depth,
                config.heads,
                config.dropout,
                context_len=self.prompt_length + config.max_text_tokens,
            )

    # Decoder vocabulary: the characters (and the unused blank), then special tokens, as Whisper appends its own.
    @property
    def sot(self) -> int:
        return self.config.vocab_size

    @property
    def eot(self) -> int:
        return self.config.vocab_size + 1

    @property
    def transcribe_token(self) -> int:
        return self.config.vocab_size + 2

    def language_token(self, language: int) -> int:
        return self.config.vocab_size + 3 + language

    @property
    def decoder_vocab_size(self) -> int:
        return self.config.vocab_size + 3 + self.config.n_languages

    @property
    def prompt_length(self) -> int:
        return 3 if self.config.n_languages else 2

    def prompts(self, languages: torch.Tensor | None) -> torch.Tensor:
        """Decoder prompts (B, prompt_length): [sot, language_token, transcribe], or [sot, transcribe] without
        languages. languages (B,) int64, each in [0, n_languages); ignored (may be None) when n_languages == 0."""
        if not self.config.n_languages:
            n = 1 if languages is None else languages.shape[0]
            return torch.tensor([self.sot, self.transcribe_token]).repeat(n, 1)
        columns = [torch.full_like(languages, self.sot), self.language_token(languages)]
        return torch.stack(columns + [torch.full_like(languages, self.transcribe_token)], dim=1)

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        return [("stem", self.encoder.stem)] + [(f"block{i + 1}", b) for i, b in enumerate(self.encoder.blocks)]

    def forward_features(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, n_mels, T), lengths (B,) valid input frames -> encoded (B, T', dim) zero at padding,
        enc_lengths (B,) = downsampled_lengths(lengths)."""
        if features.ndim != 3 or features.shape[1] != self.config.n_mels:
            raise InputError(
                f"recogniser: features must be (B, n_mels={self.config.n_mels}, T), got {tuple(features.shape)}"
            )
        if lengths.shape != (features.shape[0],):
            raise InputError(f"recogniser: lengths must be ({features.shape[0]},), got {tuple(lengths.shape)}")
        if lengths.numel() and (lengths.min() < 1 or lengths.max() > features.shape[2]):
            raise InputError(f"recogniser: lengths must lie in [1, {features.shape[2]}], got {lengths.tolist()}")
        return self.encoder(features, lengths)

    def forward_head(self, encoded: torch.Tensor, enc_lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """encoded (B, T', D), enc_lengths (B,) -> "ctc_log_probs" (B, T', vocab), "lengths" (B,) and, with
        languages, "language_logits" (B, n_languages)."""
        out = {"ctc_log_probs": self.ctc_head(encoded).log_softmax(dim=-1), "lengths": enc_lengths}
        if self.language_head is not None:
            pooled = encoded.sum(dim=1) / enc_lengths[:, None].to(encoded.dtype)  # (B, D); padding is zero
            out["language_logits"] = self.language_head(pooled)
        return out

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(*self.forward_features(features, lengths))

    def decode(self, tokens: torch.Tensor, encoded: torch.Tensor, enc_lengths: torch.Tensor) -> torch.Tensor:
        """Decoder tokens (B, L) over encoded (B, T', D) -> next-token logits (B, L, decoder_vocab_size)."""
        if self.decoder is None:
            raise InputError("recogniser: this model has no decoder (decoder_depth 0); decode with CTC")
        return self.decoder(tokens, encoded, frame_padding(enc_lengths, encoded.shape[1]))

    def loss(
        self,
        features: torch.Tensor,
        lengths: torch.Tensor,
        targets: torch.Tensor,
        target_lengths: torch.Tensor,
        languages: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """targets (B, S) characters padded with BLANK_ID, target_lengths (B,), languages (B,) with
        UNKNOWN_LANGUAGE for unlabelled clips -> (weighted loss, {"ctc", "language", "decoder", "loss"})."""
        encoded, enc_lengths = self.forward_features(features, lengths)
        out = self.forward_head(encoded, enc_lengths)
        # F.ctc_loss's "mean" divides each clip's loss by its target length, then averages over the batch.
        ctc = F.ctc_loss(
            out["ctc_log_probs"].transpose(0, 1),  # (B, T', V) -> (T', B, V)
            targets,
            enc_lengths,
            target_lengths,
            blank=BLANK_ID,
            reduction="mean",
            zero_infinity=True,
        )
        language = ctc.new_zeros(())
        if self.language_head is not None:
            known = languages != UNKNOWN_LANGUAGE
            summed = F.cross_entropy(out["language_logits"], languages, ignore_index=UNKNOWN_LANGUAGE, reduction="sum")
            language = summed / known.sum().clamp(min=1)  # 0 when no clip is labelled, rather than NaN
        if self.decoder is None:
            decoder = ctc.new_zeros(())
            total = ctc + LANGUAGE_WEIGHT * language
        else:
            decoder = self._decoder_loss(
                encoded, enc_lengths, out.get("language_logits"), targets, target_lengths, languages
            )
            total = CTC_WEIGHT * ctc + DECODER_WEIGHT * decoder + LANGUAGE_WEIGHT * language
        stats = {"ctc": ctc.item(), "language": language.item(), "decoder": decoder.item(), "loss": total.item()}
        return total, stats

    def _decoder_loss(
        self,
        encoded: torch.Tensor,
        enc_lengths: torch.Tensor,
        language_logits: torch.Tensor | None,
        targets: torch.Tensor,
        target_lengths: torch.Tensor,
        languages: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced cross-entropy of characters then eot, after the prompt."""
        batch, width = targets.shape
        if width > self.config.max_text_tokens:
            raise InputError(
                f"recogniser: targets of {width} characters exceed max_text_tokens {self.config.max_text_tokens}"
            )
        prompt_languages = None
        if language_logits is not None:
            # Unlabelled clips are prompted with the model's own guess, as they would be when transcribing.
            guessed = language_logits.detach().argmax(dim=-1)
            prompt_languages = torch.where(languages == UNKNOWN_LANGUAGE, guessed, languages)
        prompt = self.prompts(prompt_languages).to(targets.device)  # (B, P)
        if prompt.shape[0] != batch:
            prompt = prompt.expand(batch, -1)
        inputs = torch.cat([prompt, targets], dim=1)  # (B, P + S); padding after each text is never a target
        positions = torch.arange(width + 1, device=targets.device)  # (S + 1,)
        expected = torch.cat([targets, targets.new_zeros(batch, 1)], dim=1)  # (B, S + 1)
        expected = torch.where(positions == target_lengths[:, None], self.eot, expected)
        expected = expected.masked_fill(positions > target_lengths[:, None], -100)  # ignored by cross_entropy
        logits = self.decode(inputs, encoded, enc_lengths)[:, prompt.shape[1] - 1 :]  # (B, S + 1, vocab)
        return F.cross_entropy(logits.flatten(0, 1), expected.flatten(), ignore_index=-100)


class EncoderOutputs(nn.Module):
    """What `layerwise export` writes as a recogniser's main graph, everything transcription reads off the audio:
    features (B, n_mels, T), lengths (B,) -> encoded (B, T', D) zero at padding, enc_lengths (B,), then
    language_logits (B, n_languages) when the model has languages, and ctc_log_probs (B, T', vocab) when it has
    no decoder (CTC decodes it). The model's own encoder and heads; `forward_features`' input checks are left
    out because they branch on tensor values, which torch.export cannot trace into a fixed graph."""

    def __init__(self, model: SpeechRecogniser) -> None:
        super().__init__()
        self.model = model
        self.output_names = ("encoded", "enc_lengths")
        if model.language_head is not None:
            self.output_names += ("language_logits",)
        if model.decoder is None:
            self.output_names += ("ctc_log_probs",)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoded, enc_lengths = self.model.encoder(features, lengths)
        head = self.model.forward_head(encoded, enc_lengths) | {"encoded": encoded, "enc_lengths": enc_lengths}
        return tuple(head[name] for name in self.output_names)


class DecoderLogits(nn.Module):
    """One step of the autoregressive loop, as `layerwise export` writes it: tokens (B, S) int64 (prompt and the
    characters so far), encoded (B, T', D), enc_lengths (B,) -> logits (B, S, decoder_vocab_size), position i's
    predicting token i + 1 (`SpeechRecogniser.decode`)."""

    def __init__(self, model: SpeechRecogniser) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, encoded: torch.Tensor, enc_lengths: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens, encoded, enc_lengths)


RECOGNISER_SIZES: dict[str, dict] = {
    "speech_xs": {"dim": 96, "depth": 3, "heads": 4},
    "speech_s": {"dim": 192, "depth": 6, "heads": 4},
}


def build_recogniser(
    size: str,
    n_mels: int,
    vocab_size: int,
    n_languages: int,
    decoder_depth: int,
    dropout: float = 0.1,
    max_frames: int = MAX_FRAMES,
    max_text_tokens: int = MAX_TEXT_TOKENS,
) -> SpeechRecogniser:
    """A recogniser of a named size (see RECOGNISER_SIZES), e.g. `build_recogniser("speech_xs", 80, 30, 2, 2)`."""
    if size not in RECOGNISER_SIZES:
        raise InputError(f"recogniser: unknown size {size!r} (known: {', '.join(RECOGNISER_SIZES)})")
    config = RecogniserConfig(
        n_mels,
        vocab_size,
        n_languages,
        **RECOGNISER_SIZES[size],
        decoder_depth=decoder_depth,
        dropout=dropout,
        max_frames=max_frames,
        max_text_tokens=max_text_tokens,
    )
    return SpeechRecogniser(config)


DECODER_DEPTH = 2  # the *_decoder models: a small decoder; the encoder does the acoustic work


def _registered(size: str, decoder_depth: int) -> Callable[..., SpeechRecogniser]:
    def build(
        n_mels: int, vocab_size: int, n_languages: int, max_frames: int = MAX_FRAMES,
        max_text_tokens: int = MAX_TEXT_TOKENS,
    ) -> SpeechRecogniser:  # fmt: skip
        return build_recogniser(size, n_mels, vocab_size, n_languages, decoder_depth, 0.1, max_frames, max_text_tokens)

    return build


for _size in RECOGNISER_SIZES:  # speech_xs, speech_s (CTC) and speech_xs_decoder, speech_s_decoder (hybrid)
    register_model(_size, modalities=("audio",), tasks=("transcribe",))(_registered(_size, 0))
    register_model(f"{_size}_decoder", modalities=("audio",), tasks=("transcribe",))(_registered(_size, DECODER_DEPTH))


# ---------------------------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True)
class DecodingOptions:
    beam_size: int = 1  # 1: greedy (best path for CTC)
    # None: rank finished decoder hypotheses by sum log-prob / length; a float alpha: by sum log-prob divided by
    # Google NMT's ((5 + length) / 6) ** alpha. Lengths count the characters and the eot.
    length_penalty: float | None = None
    language: int | None = None  # force this language id instead of the language head's argmax

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise InputError(f"DecodingOptions: beam_size {self.beam_size} must be at least 1")
        if self.length_penalty is not None and self.length_penalty < 0:
            raise InputError(f"DecodingOptions: length_penalty {self.length_penalty} must be None or >= 0")


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # characters only: no blank, prompt or eot
    language: int | None
    language_confidence: float | None  # the language head's probability of `language`
    # Decoder: log-prob of the characters and eot given the prompt. CTC: the best path's log-prob (greedy) or the
    # labelling's log-prob summed over its alignments (prefix beam search).
    log_prob: float
    language_probabilities: tuple[float, ...] = ()  # the language head's whole distribution; () without one


# (tokens so far (N, L), each row's clip index (N,)) -> log-probabilities of the next token (N, vocab)
StepLogProbs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def normalised_score(log_prob: float, length: int, length_penalty: float | None) -> float:
    """The score beam search ranks finished hypotheses by (see DecodingOptions.length_penalty)."""
    if length_penalty is None:
        return log_prob / length
    return log_prob / ((5 + length) / 6) ** length_penalty


def greedy_search(
    step: StepLogProbs, prompts: torch.Tensor, eot: int, max_new_tokens: int
) -> list[tuple[list[int], float]]:
    """Take the most likely token until eot, forcing eot after max_new_tokens others. prompts (B, P) ->
    per clip (tokens after the prompt without eot, their log-prob including eot's)."""
    batch, prompt_len = prompts.shape
    tokens = prompts
    log_prob = torch.zeros(batch, dtype=torch.float64)
    alive = torch.arange(batch)  # clips not yet at eot, in clip order (beam_search steps the same rows)
    for i in range(max_new_tokens + 1):
        log_probs = step(tokens[alive], alive)  # (N, vocab)
        if i == max_new_tokens:
            chosen = torch.full((len(alive),), eot, dtype=torch.long)
        else:
            chosen = log_probs.argmax(dim=-1)  # (N,)
        log_prob[alive] += log_probs.gather(1, chosen[:, None])[:, 0].double().cpu()
        new_column = torch.full((batch, 1), eot, dtype=tokens.dtype, device=tokens.device)
        new_column[alive.to(tokens.device), 0] = chosen.to(tokens.device)
        tokens = torch.cat([tokens, new_column], dim=1)
        alive = alive[chosen.cpu() != eot]
        if not len(alive):
            break
    results = []
    for row, score in zip(tokens[:, prompt_len:].tolist(), log_prob.tolist(), strict=True):
        results.append((row[: row.index(eot)], score))
    return results


def beam_search(
    step: StepLogProbs,
    prompts: torch.Tensor,
    eot: int,
    max_new_tokens: int,
    beam_size: int,
    length_penalty: float | None = None,
) -> list[tuple[list[int], float]]:
    """Beam search batched over clips: each clip keeps beam_size unfinished sequences and collects finished ones
    until it has beam_size of them; the best finished one by `normalised_score` wins. prompts (B, P) -> per clip
    (tokens after the prompt without eot, their log-prob including eot's). With beam_size 1 this is greedy_search."""
    batch, prompt_len = prompts.shape
    prompt_rows = prompts.tolist()
    alive: list[list[tuple[list[int], float]]] = [[(row, 0.0)] for row in prompt_rows]  # (tokens, log-prob)
    finished: list[list[tuple[list[int], float]]] = [[] for _ in range(batch)]
    for i in range(max_new_tokens + 1):
        rows = [(clip, seq, score) for clip in range(batch) for seq, score in alive[clip]]
        if not rows:
            break
        tokens = torch.tensor([seq for _, seq, _ in rows], dtype=prompts.dtype, device=prompts.device)
        log_probs = step(tokens, torch.tensor([clip for clip, _, _ in rows]))  # (N, vocab)
        if i == max_new_tokens:  # out of room: every sequence ends here
            top_values, top_tokens = log_probs[:, eot : eot + 1], torch.full((len(rows), 1), eot)
        else:  # beam_size + 1 so that, even when one of them is eot, beam_size sequences can go on
            top_values, top_tokens = log_probs.topk(min(beam_size + 1, log_probs.shape[1]), dim=-1)  # (N, k)
        candidates: list[list[tuple[float, list[int], int]]] = [[] for _ in range(batch)]
        for (clip, seq, score), values, toks in zip(rows, top_values.tolist(), top_tokens.tolist(), strict=True):
            candidates[clip] += [(score + value, seq, tok) for value, tok in zip(values, toks, strict=True)]
        for clip in range(batch):
            if not alive[clip]:
                continue
            alive[clip] = []
            ranked = sorted(candidates[clip], key=lambda c: -c[0])  # stable: ties keep topk order
            for rank, (score, seq, tok) in enumerate(ranked):
                if score == -math.inf:  # suppressed tokens, and all after them
                    break
                if tok == eot:
                    # Only an ending that ranks inside the beam counts: unlikely endings from the tail of the list
                    # would otherwise fill `finished` and stop the search before the likely sequences end.
                    if rank < beam_size:
                        finished[clip].append((seq[prompt_len:], score))
                else:
                    alive[clip].append((seq + [tok], score))
                    if len(alive[clip]) == beam_size:
                        break
            if len(finished[clip]) >= beam_size:
                # Stop once no live sequence, were it to end now, would beat the best ending found: counting
                # endings alone (as Whisper does) can stop before the likeliest sequence has ended.
                best = max(normalised_score(sc, len(sq) + 1, length_penalty) for sq, sc in finished[clip])
                alive[clip] = [
                    (sq, sc) for sq, sc in alive[clip]
                    if normalised_score(sc, len(sq) - prompt_len + 1, length_penalty) > best
                ]  # fmt: skip
    return [max(done, key=lambda hyp: normalised_score(hyp[1], len(hyp[0]) + 1, length_penalty)) for done in finished]


def ctc_best_path(log_probs: torch.Tensor) -> tuple[list[int], float]:
    """log_probs (T, V) -> the most likely frame labelling, repeats collapsed and blanks dropped, and its log-prob."""
    values, path = log_probs.max(dim=-1)  # (T,), (T,)
    collapsed = torch.unique_consecutive(path)
    return collapsed[collapsed != BLANK_ID].tolist(), values.sum().item()


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def _accumulate(
    beams: dict[tuple[int, ...], tuple[float, float]], prefix: tuple[int, ...], ends_blank: float, ends_char: float
) -> None:
    """Add one more way of reaching `prefix` (log-probs ending in a blank / in its last character) to `beams`."""
    old_blank, old_char = beams.get(prefix, (-math.inf, -math.inf))
    beams[prefix] = (_logaddexp(old_blank, ends_blank), _logaddexp(old_char, ends_char))


def ctc_prefix_beam_search(log_probs: torch.Tensor, beam_size: int) -> list[tuple[list[int], float]]:
    """CTC prefix beam search over log_probs (T, V), blank = BLANK_ID -> up to beam_size (labelling, log-prob)
    pairs, best first. Each prefix keeps two log-probs, of the frames so far ending in a blank and ending in its
    last character, summing every alignment that collapses to it; prefixes reached by different paths merge.

    No length normalisation here: every prefix accounts for all T frames, so scores are comparable as they are."""
    if beam_size < 1:
        raise InputError(f"ctc_prefix_beam_search: beam_size {beam_size} must be at least 1")
    neg_inf = -math.inf
    frames = log_probs.double().cpu().tolist()  # (T, V) as Python floats: the loop below is scalar work
    # Per frame, only the top beam_size + 1 characters can start a new prefix that survives pruning (one of them
    # may be the prefix's last character, which needs a blank in between); characters that extend a prefix into
    # another live prefix are added too, so merging stays exact.
    top_chars = log_probs[:, 1:].topk(min(beam_size + 1, log_probs.shape[1] - 1), dim=-1).indices + 1  # (T, k)
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, neg_inf)}  # prefix -> (ends blank, ends char)
    for lp, chars in zip(frames, top_chars.tolist(), strict=True):
        blank = lp[BLANK_ID]
        extend_to_live = {prefix[-1] for prefix in beams if prefix}
        next_beams: dict[tuple[int, ...], tuple[float, float]] = {}
        for prefix, (p_blank, p_char) in beams.items():
            total = _logaddexp(p_blank, p_char)
            _accumulate(next_beams, prefix, total + blank, neg_inf)  # a blank keeps the prefix
            if prefix:  # repeating the last character without a blank collapses into it
                _accumulate(next_beams, prefix, neg_inf, p_char + lp[prefix[-1]])
            for char in set(chars) | extend_to_live:
                if prefix and char == prefix[-1]:  # a doubled character needs a blank between its two copies
                    _accumulate(next_beams, prefix + (char,), neg_inf, p_blank + lp[char])
                else:
                    _accumulate(next_beams, prefix + (char,), neg_inf, total + lp[char])
        ranked = sorted(next_beams.items(), key=lambda item: -_logaddexp(*item[1]))
        beams = dict(ranked[:beam_size])
    return [(list(prefix), _logaddexp(*scores)) for prefix, scores in beams.items()]


@torch.no_grad()
def transcribe(
    model: SpeechRecogniser,
    features: torch.Tensor,
    lengths: torch.Tensor,
    options: DecodingOptions | None = None,
) -> list[Hypothesis]:
    """Transcribe a batch: features (B, n_mels, T), lengths (B,) -> one Hypothesis per clip. Uses the decoder
    when the model has one, else CTC. The model is put in eval mode for the call and restored after."""
    options = options or DecodingOptions()
    config = model.config
    if options.language is not None and not 0 <= options.language < config.n_languages:
        raise InputError(f"transcribe: language {options.language} is not in [0, {config.n_languages})")
    was_training = model.training
    model.eval()
    try:
        encoded, enc_lengths = model.forward_features(features, lengths)
        out = model.forward_head(encoded, enc_lengths)
        languages, confidences = _choose_languages(out.get("language_logits"), options.language, features.shape[0])
        if model.decoder is None:
            texts = _ctc_decode(out["ctc_log_probs"], enc_lengths, options.beam_size)
        else:
            texts = _decoder_decode(model, encoded, enc_lengths, languages, options)
    finally:
        model.train(was_training)
    logits = out.get("language_logits")
    distributions = [()] * len(texts) if logits is None else [tuple(p) for p in logits.float().softmax(-1).tolist()]
    return [
        Hypothesis(tokens, language, confidence, log_prob, distribution)
        for (tokens, log_prob), language, confidence, distribution in zip(
            texts, languages, confidences, distributions, strict=True
        )
    ]


def _choose_languages(
    logits: torch.Tensor | None, forced: int | None, batch: int
) -> tuple[list[int | None], list[float | None]]:
    if logits is None:
        return [None] * batch, [None] * batch
    probs = logits.float().softmax(dim=-1)  # (B, n_languages)
    chosen = probs.argmax(dim=-1) if forced is None else torch.full((batch,), forced, device=probs.device)
    return chosen.tolist(), probs.gather(1, chosen[:, None])[:, 0].tolist()


def _ctc_decode(log_probs: torch.Tensor, enc_lengths: torch.Tensor, beam_size: int) -> list[tuple[list[int], float]]:
    results = []
    for clip_log_probs, length in zip(log_probs, enc_lengths.tolist(), strict=True):
        valid = clip_log_probs[:length]  # (T_i, V)
        results.append(ctc_best_path(valid) if beam_size == 1 else ctc_prefix_beam_search(valid, beam_size)[0])
    return results


def _decoder_decode(
    model: SpeechRecogniser,
    encoded: torch.Tensor,
    enc_lengths: torch.Tensor,
    languages: list[int | None],
    options: DecodingOptions,
) -> list[tuple[list[int], float]]:
    prompt_languages = None if languages[0] is None else torch.tensor(languages)
    prompts = model.prompts(prompt_languages).to(encoded.device)  # (B, P)
    prompts = prompts.expand(encoded.shape[0], -1)
    suppressed = torch.ones(model.decoder_vocab_size, dtype=torch.bool, device=encoded.device)
    suppressed[1 : model.config.vocab_size] = False  # characters may be generated; blank and prompt tokens not
    suppressed[model.eot] = False

    def step(tokens: torch.Tensor, clips: torch.Tensor) -> torch.Tensor:
        clips = clips.to(encoded.device)
        logits = model.decode(tokens, encoded[clips], enc_lengths[clips])[:, -1]  # (N, decoder vocab)
        return logits.float().masked_fill(suppressed, -math.inf).log_softmax(dim=-1)

    max_new = model.config.max_text_tokens
    if options.beam_size == 1:
        return greedy_search(step, prompts, model.eot, max_new)
    return beam_search(step, prompts, model.eot, max_new, options.beam_size, options.length_penalty)
