"""Report sections of the fold task: per-chain structure metrics, predicted and true distance/contact maps,
superposed Cα traces coloured by confidence, and how well pLDDT predicts the true per-residue lDDT.

Each chain is a dict: "name" (str), "sequence" (str, length L), "true" and "predicted" (L, 3) Cα in Å (the
prediction already superposed onto the truth), "mask" (L,) bool (True where the true Cα is known), "plddt" (L,)
in 0-100, "lddt" (L,) true per-residue lDDT in 0-1 (NaN where undefined) and "metrics" {"lddt_ca", "rmsd",
"gdt_ts", "tm_score"}.
"""

from __future__ import annotations

import html
import io

import matplotlib
import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from PIL import Image

from layerwise.report.html import figure_png, png_data_uri

FIGURE_DPI = 100
DISTANCE_MAX = 22.0  # Å: top of the colour scale, the distogram's last bin edge (models/folder.py)
CONTACT = 8.0  # Å: a Cα pair closer than this is a contact (the CASP convention)
MAX_FIGURE_CHAINS = 6  # chains drawn; the metrics table lists every chain
PROFILE_CHAINS = 2  # chains whose pLDDT and lDDT are also drawn along the sequence
PROJECTIONS = ((0, 1), (0, 2), (1, 2))  # xy, xz, yz
DISTANCE_CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="#d5d9de")  # grey: true distance unknown
PREDICTED_RGB, TRUE_RGB, UNKNOWN_RGB = (0.75, 0.22, 0.17), (0.18, 0.52, 0.25), (0.84, 0.85, 0.87)
TRUE_TRACE = "#8a939c"
# AlphaFold DB's pLDDT bands and colours, so a reader who knows those pictures reads these the same way
PLDDT_CMAP = ListedColormap(["#ff7d45", "#ffdb13", "#65cbf3", "#0053d6"])
PLDDT_NORM = BoundaryNorm([0, 50, 70, 90, 100], PLDDT_CMAP.N)
METRICS = (("lddt_ca", "lDDT-Cα", ".3f"), ("rmsd", "RMSD (Å)", ".2f"), ("gdt_ts", "GDT-TS", ".3f"),
           ("tm_score", "TM-score", ".3f"))  # fmt: skip


def _png(fig: Figure) -> bytes:
    """`figure_png` re-encoded with a 256-colour palette: a third of the bytes, and no visible change for
    these flat-coloured plots (the report inlines a dozen of them)."""
    image = Image.open(io.BytesIO(figure_png(fig, dpi=FIGURE_DPI))).convert("RGB")
    buffer = io.BytesIO()
    image.quantize(256, method=Image.Quantize.FASTOCTREE).save(buffer, format="PNG")
    return buffer.getvalue()


def _plot_text(text: str) -> str:
    """`text` made safe for a matplotlib label: '$' would start mathtext."""
    return text.replace("$", r"\$")


def _number(value: object) -> float | None:
    """`value` as a finite float, else None (a metric that could not be computed)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _cell(value: object, spec: str) -> str:
    """A metric formatted for a table cell or a caption; a dash when missing or NaN."""
    number = _number(value)
    return "—" if number is None else format(number, spec)


def _figure(png: bytes, alt: str, caption: str) -> str:
    """An inline image with an escaped caption."""
    return (
        f'<figure><img class="figure" src="{png_data_uri(png)}" alt="{html.escape(alt)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _as_arrays(chain: dict) -> dict:
    """A copy of `chain` with float64/bool arrays, checked against the sequence length L."""
    length = len(chain["sequence"])
    out = dict(chain)
    for key, shape, dtype in (("true", (length, 3), np.float64), ("predicted", (length, 3), np.float64),
                              ("mask", (length,), bool), ("plddt", (length,), np.float64),
                              ("lddt", (length,), np.float64)):  # fmt: skip
        out[key] = np.asarray(chain[key], dtype=dtype)
        if out[key].shape != shape:
            raise ValueError(
                f"fold chain {chain['name']!r}: {key!r} has shape {out[key].shape}, expected {shape} "
                f"(the sequence has {length} residues)"
            )
    return out


def pairwise_distances(coords: np.ndarray) -> np.ndarray:
    """(L, 3) Å -> (L, L) Å; a NaN coordinate gives NaN distances in its row and column."""
    return np.linalg.norm(coords[:, None, :] - coords[None, :, :], axis=-1)


def _contact_rgb(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(L, L, 3) image: predicted contacts above the diagonal, true contacts on and below it, grey where the
    true distance is unknown (NaN)."""
    upper = np.triu(np.ones(predicted.shape, bool), k=1)
    contact = np.where(upper, predicted < CONTACT, true < CONTACT)  # NaN compares False: no contact
    rgb = np.ones(predicted.shape + (3,))
    rgb[contact & upper] = PREDICTED_RGB
    rgb[contact & ~upper] = TRUE_RGB
    rgb[~upper & np.isnan(true)] = UNKNOWN_RGB
    return rgb


def distance_map_png(predicted: np.ndarray, true: np.ndarray | None = None, title: str = "") -> bytes:
    """PNG of a predicted (L, L) Cα distance map in Å, on a fixed 0-22 Å colour scale.

    With `true` (L, L) Å (NaN where unknown) it is drawn beside the prediction on the same scale, with a third
    panel of contacts (< 8 Å): predicted above the diagonal, true below.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    true = None if true is None else np.asarray(true, dtype=np.float64)
    panels = [("predicted", predicted)] + ([] if true is None else [("true", true)])
    columns = len(panels) + (true is not None)
    fig = Figure(figsize=(3.2 * columns + 0.8, 3.4), layout="constrained")
    axes = fig.subplots(1, columns, squeeze=False)[0]
    for ax, (label, distances) in zip(axes[: len(panels)], panels, strict=True):
        image = ax.imshow(distances, cmap=DISTANCE_CMAP, vmin=0.0, vmax=DISTANCE_MAX)
        ax.set_title(f"{label} distances", fontsize=10)
    fig.colorbar(image, ax=axes[: len(panels)], label="Cα distance (Å)", shrink=0.85)
    if true is not None:
        ax = axes[-1]
        ax.imshow(_contact_rgb(predicted, true))
        ax.set_title(f"contacts < {CONTACT:g} Å", fontsize=10)
        ax.text(0.97, 0.97, "predicted", color=PREDICTED_RGB, transform=ax.transAxes, ha="right", va="top")
        ax.text(0.03, 0.03, "true", color=TRUE_RGB, transform=ax.transAxes, ha="left", va="bottom")
    for ax in axes:
        ax.set_xlabel("residue")
    axes[0].set_ylabel("residue")
    if title:
        fig.suptitle(_plot_text(title), fontsize=11)
    return _png(fig)


def traces_png(true: np.ndarray, predicted: np.ndarray, mask: np.ndarray, plddt: np.ndarray) -> bytes:
    """PNG of the true (grey) and predicted (coloured by pLDDT) Cα traces, (L, 3) Å each, projected on xy, xz
    and yz. Residues with `mask` False are left out and the lines break there."""
    known = np.where(mask[:, None], true, np.nan)  # NaN breaks matplotlib's line at unknown residues
    bonded = mask[:-1] & mask[1:]  # (L-1,) both ends known: a predicted segment is drawn
    confidence = ((plddt[:-1] + plddt[1:]) / 2)[bonded]  # (S,) one colour per segment
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    axes = fig.subplots(1, len(PROJECTIONS))
    for ax, (a, b) in zip(axes, PROJECTIONS, strict=True):
        ax.plot(known[:, a], known[:, b], color=TRUE_TRACE, linewidth=2.5, alpha=0.6)
        xy = predicted[:, [a, b]]
        segments = np.stack([xy[:-1], xy[1:]], axis=1)[bonded]  # (S, 2 ends, 2 coordinates)
        lines = LineCollection(segments, cmap=PLDDT_CMAP, norm=PLDDT_NORM, linewidths=1.2)
        lines.set_array(confidence)
        ax.add_collection(lines)
        ax.autoscale_view()
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel(f"{'xyz'[a]} (Å)")
        ax.set_ylabel(f"{'xyz'[b]} (Å)")
        ax.tick_params(labelsize=8)
    fig.colorbar(lines, ax=axes, label="pLDDT", shrink=0.85)
    return _png(fig)


def _confidence_pairs(chain: dict) -> tuple[np.ndarray, np.ndarray]:
    """(pLDDT / 100, true lDDT) over the residues where both are defined."""
    keep = np.isfinite(chain["plddt"]) & np.isfinite(chain["lddt"])
    return chain["plddt"][keep] / 100, chain["lddt"][keep]


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation of two (N,) arrays; None if undefined (fewer than 2 points or a constant side)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _r_text(r: float | None) -> str:
    return "undefined" if r is None else f"{r:.2f}"


def confidence_scatter_png(chains: list[dict]) -> bytes:
    """PNG of per-residue pLDDT / 100 against true lDDT, one colour per chain; the diagonal is perfect."""
    fig = Figure(figsize=(4.8, 4.4), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for chain in chains:
        x, y = _confidence_pairs(chain)
        label = f"{_plot_text(chain['name'])} (r = {_r_text(pearson(x, y))})"
        ax.scatter(x, y, s=6, alpha=0.5, label=label)
    ax.set_xlabel("pLDDT / 100")
    ax.set_ylabel("true lDDT")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", markerscale=2)
    return _png(fig)


def confidence_profile_png(chains: list[dict]) -> bytes:
    """PNG with one panel per chain of pLDDT / 100 and true lDDT along the sequence (gaps where undefined)."""
    fig = Figure(figsize=(9, 2.2 * len(chains)), layout="constrained")
    axes = fig.subplots(len(chains), 1, squeeze=False)[:, 0]
    for ax, chain in zip(axes, chains, strict=True):
        residue = np.arange(1, len(chain["plddt"]) + 1)
        ax.plot(residue, chain["plddt"] / 100, label="pLDDT / 100", color="#0053d6", linewidth=1.2)
        ax.plot(residue, chain["lddt"], label="true lDDT", color="#2e8540", linewidth=1.2)
        ax.set_title(_plot_text(chain["name"]), fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.margins(x=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    axes[-1].set_xlabel("residue")
    return _png(fig)


def _metric_cells(metrics: dict) -> str:
    return "".join(f"<td>{_cell(metrics.get(key), spec)}</td>" for key, _, spec in METRICS)


def _mean(values: list[object]) -> float | None:
    """Mean of the finite values; None if there are none."""
    numbers = [n for n in map(_number, values) if n is not None]
    return float(np.mean(numbers)) if numbers else None


def metrics_table_html(chains: list[dict], baselines: dict[str, dict[str, float]] | None = None) -> str:
    """One row per chain, then (for several chains or any baselines) their mean and one row per baseline."""
    head = "".join(f"<th>{label}</th>" for _, label, _ in METRICS)
    rows = [f"<tr><th>chain</th><th>length</th><th>known Cα</th>{head}<th>mean pLDDT</th></tr>"]
    for chain in chains:
        rows.append(
            f"<tr><th>{html.escape(chain['name'])}</th><td>{len(chain['sequence'])}</td>"
            f"<td>{int(chain['mask'].sum())}</td>{_metric_cells(chain['metrics'])}"
            f"<td>{_cell(np.mean(chain['plddt']), '.1f')}</td></tr>"
        )
    if len(chains) > 1 or baselines:
        mean = {key: _mean([c["metrics"].get(key) for c in chains]) for key, _, _ in METRICS}
        plddt = _mean([np.mean(c["plddt"]) for c in chains])
        rows.append(
            f'<tr class="total"><th>mean of {len(chains)} chains</th><td></td><td></td>{_metric_cells(mean)}'
            f"<td>{_cell(plddt, '.1f')}</td></tr>"
        )
    for name, metrics in (baselines or {}).items():
        rows.append(
            f"<tr><th>baseline: {html.escape(name)}</th><td></td><td></td>{_metric_cells(metrics)}<td></td></tr>"
        )
    return '<table class="metrics">\n' + "\n".join(rows) + "\n</table>"


def contact_maps_html(chains: list[dict]) -> str:
    figures = []
    for chain in chains:
        predicted = pairwise_distances(chain["predicted"])
        true = pairwise_distances(np.where(chain["mask"][:, None], chain["true"], np.nan))
        caption = f"{chain['name']}: lDDT-Cα {_cell(chain['metrics'].get('lddt_ca'), '.3f')}"
        figures.append(_figure(distance_map_png(predicted, true), f"distance maps of {chain['name']}", caption))
    note = (
        f'<p class="note">Cα distances on one scale (0&ndash;{DISTANCE_MAX:g} Å; grey: true position unknown). '
        f"Right: contacts (&lt; {CONTACT:g} Å), predicted above the diagonal, true below.</p>"
    )
    return note + "\n".join(figures)


def traces_html(chains: list[dict]) -> str:
    figures = [
        _figure(
            traces_png(c["true"], c["predicted"], c["mask"], c["plddt"]),
            f"Cα traces of {c['name']}",
            f"{c['name']}: RMSD {_cell(c['metrics'].get('rmsd'), '.2f')} Å",
        )
        for c in chains
    ]
    note = (
        '<p class="note">Grey: the true trace; coloured: the prediction superposed on it, by pLDDT '
        "(AlphaFold DB's bands). Lines break where the true position is unknown.</p>"
    )
    return note + "\n".join(figures)


def confidence_html(chains: list[dict]) -> str:
    pairs = [_confidence_pairs(c) for c in chains]
    x, y = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    caption = (
        f"Per-residue pLDDT / 100 against true lDDT over {len(x)} residues of {len(chains)} chains: "
        f"Pearson r = {_r_text(pearson(x, y))} (the dashed diagonal is perfect calibration)."
    )
    profiles = chains[:PROFILE_CHAINS]
    profile_caption = "pLDDT and true lDDT along the sequence of " + ", ".join(c["name"] for c in profiles) + "."
    return _figure(confidence_scatter_png(chains), "pLDDT against true lDDT", caption) + _figure(
        confidence_profile_png(profiles), "pLDDT and lDDT along the sequence", profile_caption
    )


def fold_sections(chains: list[dict], baselines: dict[str, dict[str, float]] | None = None) -> list[tuple[str, str]]:
    """(heading, trusted HTML) pairs for report.html from validation chains (see the module docstring).

    `baselines` maps a baseline's name (e.g. "template", "helix") to its metrics, shown under the chains' mean.
    Figures are drawn for the first MAX_FIGURE_CHAINS chains only.
    """
    if not chains:
        return []
    chains = [_as_arrays(c) for c in chains]
    drawn = chains[:MAX_FIGURE_CHAINS]
    table = metrics_table_html(chains, baselines)
    if len(drawn) < len(chains):
        table += f'<p class="note">Figures below show the first {len(drawn)} of {len(chains)} chains.</p>'
    return [
        ("Structure metrics per chain", table),
        ("Predicted vs true contact maps", contact_maps_html(drawn)),
        ("Superposed Cα traces", traces_html(drawn)),
        ("Confidence: pLDDT vs true lDDT", confidence_html(drawn)),
    ]
