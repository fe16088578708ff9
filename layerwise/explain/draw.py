"""Pictures a person can read: attribution overlays, token highlights, and the layer figures.

Figures are matplotlib `Figure`s (no pyplot state) rendered with `figure_png`; HTML fragments
escape every string that comes from data (tokens, class names, paths).
"""

from __future__ import annotations

import html

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from layerwise.explain.attribution import METHOD_NAMES, Attribution
from layerwise.explain.layers import INPUT_NAME, LayerAnalysis, TopInputs
from layerwise.report.html import CSS, figure_png, png_data_uri

CONTEXT_TOKENS = 4  # tokens shown either side of a top-activating token
NEIGHBOUR_TOKENS = 12  # frequent tokens whose nearest embedding neighbours are listed
NEIGHBOURS = 5
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # by name: each tokenizer numbers them its own way
MAX_FILTERS = 64

EXPLAIN_CSS = """
.tokens { line-height: 2.1; font-size: 1rem; max-width: 60rem; }
.tok { padding: .1rem .15rem; border-radius: 3px; }
.ctx { color: #5a6470; font-size: .85rem; }
.hot { background: #fbd38d; font-weight: 600; border-radius: 3px; padding: 0 .15rem; }
table.probes td + td { text-align: right; font-variant-numeric: tabular-nums; }
.figrow { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
.figrow img { max-width: 100%; height: auto; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _label(name: str) -> str:
    """A string made safe for a matplotlib label ('$' would start mathtext)."""
    return name.replace("$", r"\$")


def _img(png: bytes, alt: str) -> str:
    return f'<img class="figure" src="{png_data_uri(png)}" alt="{_esc(alt)}">'


# ----------------------------------------------------------------------------- inputs as pictures


def _show_input(ax, item: torch.Tensor, modality: str) -> None:
    """Draw a cached input: uint8 image (C, H, W) or log-mel spectrogram (1, mels, frames)."""
    array = item.float().numpy()
    if modality == "audio":
        ax.imshow(array[0], origin="lower", aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_xlabel("frame (10 ms)")
        ax.set_ylabel("mel band")
    elif array.shape[0] == 3:
        ax.imshow(array.transpose(1, 2, 0).astype(np.uint8), interpolation="nearest")
    else:
        ax.imshow(array[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    if modality != "audio":
        ax.set_xticks([])
        ax.set_yticks([])


def attribution_png(item: torch.Tensor, attribution: Attribution, modality: str, title: str) -> bytes:
    """Input on the left, the attribution drawn over it on the right (image or spectrogram)."""
    audio = modality == "audio"
    fig = Figure(figsize=(9.0, 3.4) if audio else (6.4, 3.4))
    left, right = fig.subplots(1, 2)
    _show_input(left, item, modality)
    left.set_title("input", fontsize=9)
    _show_input(right, item, modality)
    origin, aspect = ("lower", "auto") if audio else ("upper", "equal")
    scores = attribution.scores.float()
    if attribution.method == "ig":
        heat = scores.sum(0).numpy() if scores.ndim == 3 else scores.numpy()  # (H, W), signed
        limit = float(np.percentile(np.abs(heat), 99.5)) or 1e-12
        shown = right.imshow(heat, cmap="bwr", vmin=-limit, vmax=limit, alpha=0.65, origin=origin, aspect=aspect)
        fig.colorbar(shown, ax=right, fraction=0.046, pad=0.04, label="towards (red) / against (blue)")
    else:
        heat = scores.numpy()  # (H, W), >= 0
        shown = right.imshow(
            heat, cmap="jet", vmin=0, vmax=float(heat.max()) or 1e-12, alpha=0.45, origin=origin, aspect=aspect,
        )  # fmt: skip
        fig.colorbar(shown, ax=right, fraction=0.046, pad=0.04, label="class evidence")
    right.set_title(METHOD_NAMES[attribution.method], fontsize=9)
    fig.suptitle(_label(title), fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def _token_text(token: str) -> tuple[str, bool]:
    """WordPiece token -> (text shown, joins the previous token without a space)."""
    return (token[2:], True) if token.startswith("##") else (token, False)


def token_spans(tokens: list[str], scores: list[float], signed: bool) -> str:
    """Tokens as HTML spans whose background encodes the score: red for, blue against (signed)."""
    limit = max((abs(s) for s in scores), default=0.0) or 1.0
    parts = []
    for token, score in zip(tokens, scores, strict=True):
        text, joined = _token_text(token)
        strength = min(1.0, abs(score) / limit)
        colour = (214, 39, 40) if score >= 0 or not signed else (31, 119, 180)
        style = f"background: rgba({colour[0]}, {colour[1]}, {colour[2]}, {0.75 * strength:.3f})"
        parts.append(("" if joined or not parts else " ") + f'<span class="tok" style="{style}" title="{score:.4g}">')
        parts[-1] += _esc(text) + "</span>"
    return "".join(parts)


def tokens_page(tokens: list[str], scores: list[float], method: str, title: str, note: str) -> str:
    """A self-contained HTML page: one text with each token coloured by its attribution."""
    signed = method == "ig"
    legend = (
        "Red tokens push towards the explained class, blue ones against it; stronger colour, larger effect."
        if signed
        else "Stronger red: the last layer's representation of the token carries more evidence for the class."
    )
    return _page(
        title,
        f"<h2>{_esc(METHOD_NAMES[method])}</h2>\n<p class='note'>{_esc(note)}</p>\n"
        f'<div class="tokens">{token_spans(tokens, scores, signed)}</div>\n<p class="note">{_esc(legend)}</p>',
    )


def _page(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{CSS}{EXPLAIN_CSS}</style>
</head>
<body>
<h1>{_esc(title)}</h1>
{body}
</body>
</html>
"""


# ----------------------------------------------------------------------------- layer figures


def probes_png(analysis: LayerAnalysis) -> bytes:
    """Probe accuracy against depth; the raw-input reference drawn apart, chance as a dashed line."""
    probes = analysis.probes
    fig = Figure(figsize=(max(4.5, 1.1 * len(probes) + 1.5), 3.2))
    ax = fig.subplots()
    stages = [p for p in probes if p.name != INPUT_NAME]
    ax.plot([p.depth for p in stages], [p.accuracy for p in stages], marker="o", color="#1f77b4", label="stage")
    for p in probes:
        if np.isnan(p.accuracy):
            continue
        ax.annotate(f"{p.accuracy:.1%}", (p.depth, p.accuracy), textcoords="offset points", xytext=(0, 7),
                    ha="center", fontsize=8)  # fmt: skip
    reference = [p for p in probes if p.name == INPUT_NAME]
    if reference:
        ax.plot([0], [reference[0].accuracy], marker="s", color="#7f7f7f", linestyle="none", label="raw input")
    if not np.isnan(analysis.chance):
        ax.axhline(analysis.chance, color="#c0392b", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks([p.depth for p in probes], [_label(p.name) for p in probes], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("probe accuracy (held out)")
    ax.set_xlabel("depth")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return figure_png(fig)


def filters_png(weights: torch.Tensor) -> bytes:
    """First convolution's filters (out, in, kh, kw) as a grid: RGB for 3 input channels, else signed colours."""
    weights = weights[:MAX_FILTERS]
    n = len(weights)
    cols = min(16, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(0.55 * cols + 0.4, 0.55 * rows + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= n:
            continue
        w = weights[k].numpy()
        if w.shape[0] == 3:
            lo, hi = w.min(), w.max()
            ax.imshow(((w - lo) / max(hi - lo, 1e-12)).transpose(1, 2, 0), interpolation="nearest")
        else:
            mean = w.mean(0)
            limit = float(np.abs(mean).max()) or 1e-12
            ax.imshow(mean, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    fig.suptitle(f"{n} first-layer filters", fontsize=9)
    fig.tight_layout(pad=0.2)
    return figure_png(fig)


def _patch_rgb(patch: np.ndarray, audio: bool, limits: tuple[float, float]) -> np.ndarray:
    """One input region (C, h, w) as RGB floats (h, w, 3) in [0, 1]; spectrograms low frequencies down."""
    if audio:
        scaled = np.clip((patch[0] - limits[0]) / max(limits[1] - limits[0], 1e-6), 0, 1)
        return colormaps["magma"](scaled[::-1])[..., :3]
    grey_or_rgb = patch.transpose(1, 2, 0) / 255
    return np.repeat(grey_or_rgb, 3, axis=2) if patch.shape[0] == 1 else grey_or_rgb


def top_inputs_png(analysis: LayerAnalysis, top: TopInputs) -> bytes:
    """Rows: units of one stage; columns: the input regions (receptive fields) that excite each most.

    The regions are tiled into one mosaic (one imshow, fast): a region cut by the input border is
    smaller than its cell and sits in its middle.
    """
    input_hw = tuple(analysis.inputs.shape[2:])
    audio = analysis.modality == "audio"
    values = analysis.inputs.float()
    limits = (float(values.quantile(0.01)), float(values.max())) if audio else (0.0, 255.0)
    tiles = [
        [
            _patch_rgb(analysis.inputs[example, :, y0:y1, x0:x1].float().numpy(), audio, limits)
            for example, position in zip(examples, positions, strict=True)
            for y0, y1, x0, x1 in [top.field.box(position, top.grid, input_hw)]
        ]
        for examples, positions in zip(top.examples, top.positions, strict=True)
    ]
    cell_h = max(t.shape[0] for row in tiles for t in row)
    cell_w = max(t.shape[1] for row in tiles for t in row)
    gap = max(1, max(cell_h, cell_w) // 8)
    rows, cols = len(tiles), max(len(row) for row in tiles)
    mosaic = np.ones((rows * (cell_h + gap) - gap, cols * (cell_w + gap) - gap, 3))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            y = r * (cell_h + gap) + (cell_h - tile.shape[0]) // 2
            x = c * (cell_w + gap) + (cell_w - tile.shape[1]) // 2
            mosaic[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    scale = 0.9 / max(cell_h, cell_w)  # inches per input pixel: a cell is at most 0.9 in
    fig = Figure(figsize=(mosaic.shape[1] * scale + 1.0, mosaic.shape[0] * scale + 0.5))
    ax = fig.subplots()
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * (cell_h + gap) + cell_h / 2 for r in range(rows)], [f"unit {u}" for u in top.units], fontsize=8)
    ax.spines[:].set_visible(False)
    h, w = top.field.size
    ax.set_title(f"{_label(top.stage)}: receptive field {min(h, input_hw[0])}×{min(w, input_hw[1])}", fontsize=9)
    fig.tight_layout(pad=0.3)
    return figure_png(fig)


def top_tokens_html(analysis: LayerAnalysis, top: TopInputs, id_to_token) -> str:
    """For each unit of one sequence stage: the tokens (in context) where it fires most."""
    rows = []
    for unit, examples, positions in zip(top.units, top.examples, top.positions, strict=True):
        cells = []
        for example, position in zip(examples, positions, strict=True):
            ids = analysis.inputs[example].tolist()
            lo, hi = max(1, position - CONTEXT_TOKENS), min(len(ids), position + CONTEXT_TOKENS + 1)
            words = []
            for t in range(lo, hi):
                token = id_to_token(ids[t])
                if token is None or token == "[PAD]":
                    continue
                text = _esc(_token_text(token)[0])
                words.append(f'<span class="hot">{text}</span>' if t == position else text)
            cells.append(f'<span class="ctx">{" ".join(words)}</span>')
        rows.append(f"<tr><th>unit {unit}</th><td>{' &middot; '.join(cells)}</td></tr>")
    return f"<h3>{_esc(top.stage)}</h3>\n<table>\n" + "\n".join(rows) + "\n</table>"


def neighbours_html(table: torch.Tensor, analysis: LayerAnalysis, id_to_token) -> str:
    """First-layer token embeddings: the nearest neighbours (cosine) of the most frequent tokens."""
    ids = analysis.inputs.flatten()
    special = torch.tensor([i for i in ids.unique().tolist() if id_to_token(i) in SPECIAL_TOKENS], dtype=ids.dtype)
    counts = torch.bincount(ids[~torch.isin(ids, special)], minlength=len(table))
    frequent = [int(i) for i in counts.argsort(descending=True) if counts[i] > 0][:NEIGHBOUR_TOKENS]
    unit = torch.nn.functional.normalize(table, dim=1)
    rows = []
    for token_id in frequent:
        similarity = unit @ unit[token_id]
        similarity[token_id] = -2
        similarity[:4] = -2
        near = similarity.topk(NEIGHBOURS).indices.tolist()
        listed = ", ".join(_esc(id_to_token(i)) for i in near)
        rows.append(f"<tr><th>{_esc(id_to_token(token_id))}</th><td>{listed}</td></tr>")
    return (
        "<table>\n<tr><th>token</th><th>nearest in the learned embedding</th></tr>\n" + "\n".join(rows) + "\n</table>"
    )


def projection_png(analysis: LayerAnalysis) -> bytes:
    """t-SNE of the final features, one colour per class."""
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    n_classes = len(analysis.class_names)
    cmap = colormaps["tab10" if n_classes <= 10 else "tab20"]
    for k, name in enumerate(analysis.class_names):
        points = analysis.embedding_2d[analysis.embedding_labels == k]
        if len(points):
            ax.scatter(points[:, 0], points[:, 1], s=6, color=cmap(k % cmap.N), label=_label(name[:24]), alpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    if n_classes <= 20:
        ax.legend(frameon=False, fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(f"t-SNE of the final features ({len(analysis.embedding_labels)} examples)", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


# ----------------------------------------------------------------------------- the layers section


def layer_figures(analysis: LayerAnalysis) -> dict[str, bytes]:
    """Every PNG of the layers view by file stem: probes, filters, patches_<stage>, projection."""
    figures = {"probes": probes_png(analysis)}
    if analysis.first_layer is not None and analysis.first_layer[1].ndim == 4:
        figures["filters"] = filters_png(analysis.first_layer[1])
    for top in analysis.top_inputs:
        if top.field is not None:
            figures[f"patches_{top.stage}"] = top_inputs_png(analysis, top)
    figures["projection"] = projection_png(analysis)
    return figures


def _accuracy(value: float) -> str:
    return "&mdash;" if np.isnan(value) else f"{100 * value:.1f}%"


def probe_table(analysis: LayerAnalysis) -> str:
    rows = "\n".join(
        f"<tr><td>{_esc(p.name)}</td><td>{p.depth}</td><td>{p.n_features:,}</td>"
        f"<td>{_esc('×'.join(map(str, p.shape)))}</td><td>{_accuracy(p.accuracy)}</td></tr>"
        for p in analysis.probes
    )
    head = "<tr><th>stage</th><th>depth</th><th>probe features</th><th>output shape</th><th>probe accuracy</th></tr>"
    return f'<table class="probes">\n{head}\n{rows}\n</table>'


def layers_fragment(analysis: LayerAnalysis, figures: dict[str, bytes], id_to_token=None) -> str:
    """The trusted HTML of the layers view (used in report.html and layers.html)."""
    parts = [
        "<h3>(a) Linear probes: how much class information each stage holds</h3>",
        f'<p class="note">A logistic regression is fitted on the frozen output of each stage, pooled over '
        f"positions (mean and max of every unit), for {analysis.n_fit:,} examples and scored on "
        f"{analysis.n_score:,} others; chance is {_accuracy(analysis.chance)}. Depth 0 is the raw input, downsampled, "
        "for reference: it keeps its pixel layout while stage outputs are pooled over positions, so an early "
        "stage can score below it.</p>",
        _img(figures["probes"], "probe accuracy per stage"),
        probe_table(analysis),
        *(
            [
                '<p class="empty">Too few examples to score the probes: a probe needs at least two examples of a '
                "class, one to learn from and one to score.</p>"
            ]
            if np.isnan(analysis.chance)
            else []
        ),
        "<h3>(b) What the first layer learned</h3>",
    ]
    if "filters" in figures:
        name = analysis.first_layer[0] if analysis.first_layer else "first convolution"
        parts += [
            f'<p class="note">Weights of <code>{_esc(name)}</code>, one tile per filter '
            "(red positive, blue negative; averaged over input channels unless RGB).</p>",
            _img(figures["filters"], "first-layer filters"),
        ]
    elif analysis.first_layer is not None and id_to_token is not None:
        parts += [
            f'<p class="note">The first layer (<code>{_esc(analysis.first_layer[0])}</code>) is a token '
            "embedding: similar tokens should sit close together.</p>",
            neighbours_html(analysis.first_layer[1], analysis, id_to_token),
        ]
    else:
        parts.append('<p class="empty">No convolution or embedding found in the first layer.</p>')
    parts.append("<h3>(c) What excites units of each stage</h3>")
    parts.append(
        '<p class="note">For a few units per stage (those whose peak activation varies most across the data), '
        "the input regions or tokens where they fire most. Deeper stages look at larger regions.</p>"
    )
    for top in analysis.top_inputs:
        key = f"patches_{top.stage}"
        if key in figures:
            parts.append(_img(figures[key], f"top-activating regions of {top.stage}"))
        elif id_to_token is not None:
            parts.append(top_tokens_html(analysis, top, id_to_token))
    parts += [
        "<h3>(d) The final features, in two dimensions</h3>",
        _img(figures["projection"], "t-SNE of the final features"),
    ]
    return "\n".join(parts)


def layers_page(analysis: LayerAnalysis, figures: dict[str, bytes], title: str, id_to_token=None) -> str:
    """`layers.html`: the layers view as a self-contained page."""
    return _page(title, layers_fragment(analysis, figures, id_to_token))
