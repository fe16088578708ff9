"""Report sections of the generation task: sample continuations and tokenizer statistics."""

from __future__ import annotations

import html


def samples_html(samples: list[dict]) -> str:
    """Prompts taken from the validation text, each with the model's continuation."""
    if not samples:
        return '<p class="empty">No samples were generated.</p>'
    cards = [
        f'<div class="card"><pre class="snippet"><b>{html.escape(s["prompt"])}</b>{html.escape(s["continuation"])}'
        "</pre></div>"
        for s in samples
    ]
    note = (
        '<p class="note">Prompts are the openings of held-out validation text (bold); the rest is sampled '
        "(temperature 0.8, top-k 50). Per-epoch samples are in history.jsonl.</p>"
    )
    return note + "\n" + "\n".join(cards)


def tokenizer_html(stats: dict) -> str:
    rows = "\n".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in stats.items())
    return f'<table class="summary">\n{rows}\n</table>'
