"""The explain and layers workflows behind `layerwise explain`, `layerwise layers` and the report section."""

from __future__ import annotations

import html
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from layerwise.data.sources import Problem, discover
from layerwise.errors import InputError
from layerwise.explain.attribution import METHOD_NAMES, METHODS, Attribution, attribute
from layerwise.explain.draw import attribution_png, layer_figures, layers_fragment, layers_page, tokens_page
from layerwise.explain.layers import MAX_EXAMPLES, LayerAnalysis, analyse_layers, stratified_sample
from layerwise.explain.stages import token_mask

EXPLAIN_BATCH = 16
REPORT_EXAMPLES = 1000  # the report's layers section is computed on at most this many validation examples
REPORT_HEADING = "What each layer learned"
SCORE_DIGITS = 5  # significant digits of the raw scores in JSON


def resolve_target(target: str | None, class_names: list[str]) -> int | None:
    """--target: a class name, or a class index; None means each input's predicted class."""
    if target is None:
        return None
    if target in class_names:
        return class_names.index(target)
    if target.isdigit() and int(target) < len(class_names):
        return int(target)
    shown = ", ".join(class_names[:20]) + (" ..." if len(class_names) > 20 else "")
    raise InputError(f"--target {target!r} is not a class of this run (classes: {shown})")


def make_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--out {out_dir}: cannot write there ({err.strerror})") from err


def resolve_methods(method: str) -> tuple[str, ...]:
    if method == "both":
        return METHODS
    if method in METHODS:
        return (method,)
    raise InputError(f"--method must be ig, gradcam or both, not {method!r}")


def _rounded(values: torch.Tensor) -> list:
    return np.vectorize(lambda v: float(f"{v:.{SCORE_DIGITS}g}"), otypes=[float])(values.numpy()).tolist()


def _file_stem(index: int, origin: str) -> str:
    name = Path(origin).stem if Path(origin).suffix else origin
    return f"{index:03d}_" + (re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:40].strip("_") or "input")


def explain_inputs(
    bundle,
    inputs: list[str | Path],
    out_dir: Path,
    methods: tuple[str, ...] = METHODS,
    target: str | None = None,
    texts: list[str] | None = None,
) -> tuple[dict, list[Problem]]:
    """Attribute each input's prediction (or `target`) with each method; write pictures + explanations.json.

    Returns the JSON document (also written to out_dir/explanations.json) and the undecodable inputs.
    """
    target_index = resolve_target(target, bundle.class_names)
    examples, problems = bundle.find_inputs(inputs, texts)
    make_out_dir(out_dir)
    tensors, kept, decode_problems = bundle.frontend.decode_all(examples)
    problems += decode_problems
    network = bundle.network.eval()
    device = next(network.parameters()).device
    started = time.perf_counter()
    records = []
    for start in range(0, len(kept), EXPLAIN_BATCH):
        batch = tensors[start : start + EXPLAIN_BATCH]
        x = bundle.frontend.model_input(batch).to(device)
        with torch.no_grad():
            probabilities = torch.softmax(network(x).float() / bundle.task.temperature, 1).cpu()  # calibrated
        predicted = probabilities.argmax(1)
        targets = predicted if target_index is None else torch.full_like(predicted, target_index)
        roles = getattr(bundle.frontend, "token_roles", None)
        attributions = {method: attribute(network, x, targets, method, roles) for method in methods}
        tokens = token_mask(x, roles)
        for row in range(len(batch)):
            i = start + row
            origin = examples[kept[i]].origin
            per_method = {m: attributions[m][row] for m in methods}
            record = {
                "path": origin,
                "predicted": bundle.class_names[int(predicted[row])],
                "confidence": round(float(probabilities[row].max()), 4),
                "target": bundle.class_names[int(targets[row])],
                "target_probability": round(float(probabilities[row, targets[row]]), 4),
            }
            record |= _write_explanation(
                bundle, batch[row], per_method, None if tokens is None else tokens[row].cpu(), out_dir,
                _file_stem(i, origin), record,
            )  # fmt: skip
            records.append(record)
    seconds = time.perf_counter() - started
    document = {
        "model": bundle.config["model"]["name"],
        "methods": list(methods),
        "target": "predicted class" if target_index is None else bundle.class_names[target_index],
        "seconds": round(seconds, 3),
        "seconds_per_input": round(seconds / max(len(records), 1), 3),
        "explanations": records,
        "skipped": [p.to_json() for p in problems],
    }
    (out_dir / "explanations.json").write_text(json.dumps(document) + "\n")
    return document, problems


def _write_explanation(
    bundle, item: torch.Tensor, per_method: dict[str, Attribution], tokens: torch.Tensor | None, out_dir: Path,
    stem: str, record: dict,
) -> dict:  # fmt: skip
    """One picture (or HTML page for text) per method; returns the JSON fields with the raw scores."""
    fields: dict = {"files": {}}
    shown = Path(record["path"]).name if tokens is None else record["path"]
    title = f"{shown} - predicted {record['predicted']} ({record['confidence']:.0%})"
    if record["target"] != record["predicted"]:
        title += f", explaining {record['target']}"
    if tokens is not None:
        positions = tokens.nonzero().flatten()
        id_to_token = bundle.frontend.tokenizer.id_to_token
        fields["tokens"] = [id_to_token(int(item[p])) for p in positions]
    for method, attribution in per_method.items():
        scores = attribution.scores if tokens is None else attribution.scores[positions]
        fields[method] = {"shape": list(scores.shape), "scores": _rounded(scores)}
        if attribution.delta is not None:
            fields[method]["convergence_delta"] = round(attribution.delta, 6)
        if tokens is None:
            name = f"{stem}.{method}.png"
            (out_dir / name).write_bytes(attribution_png(item, attribution, bundle.modality, title))
        else:
            name = f"{stem}.{method}.html"
            note = f"{METHOD_NAMES[method]} for class {record['target']}; {title}"
            (out_dir / name).write_text(tokens_page(fields["tokens"], scores.tolist(), method, record["path"], note))
        fields["files"][method] = name
    return fields


def _id_to_token(frontend) -> Callable | None:
    tokenizer = getattr(frontend, "tokenizer", None)
    return tokenizer.id_to_token if tokenizer is not None else None


def analyse_data(bundle, data: str | Path, max_examples: int = MAX_EXAMPLES, seed: int = 0):
    """Decode a capped, stratified sample of labelled DATA and run the layer analysis on it."""
    source = discover(data, bundle.modality)
    examples, label_ids, problems = bundle.labelled_examples(source)
    labels = np.array(label_ids, dtype=int)
    chosen = stratified_sample(labels, max_examples, seed) if len(labels) else np.array([], dtype=int)
    tensors, kept, decode_problems = bundle.frontend.decode_all([examples[i] for i in chosen])
    problems += decode_problems
    labels = labels[chosen][kept]
    if len(kept) < 4 or len(np.unique(labels)) < 2:
        raise InputError(
            f"{source.root}: probing the layers needs at least 4 usable labelled examples of 2 or more of the "
            f"model's classes (found {len(kept)} example(s) of {len(np.unique(labels))} class(es))"
        )
    analysis = analyse_layers(bundle.network, bundle.frontend, bundle.class_names, tensors, labels, max_examples, seed)
    return analysis, problems


def write_layers(analysis: LayerAnalysis, bundle, out_dir: Path, extra: dict | None = None) -> dict:
    """layers.html (self-contained), one PNG per figure and layers.json into out_dir; returns the JSON."""
    make_out_dir(out_dir)
    figures = layer_figures(analysis)
    for stem, png in figures.items():
        (out_dir / f"{stem}.png").write_bytes(png)
    title = f"What each layer learned: {bundle.config['model']['name']}"
    (out_dir / "layers.html").write_text(layers_page(analysis, figures, title, _id_to_token(bundle.frontend)))
    document = analysis.to_json() | {"model": bundle.config["model"]["name"], "figures": sorted(figures)}
    document |= extra or {}
    (out_dir / "layers.json").write_text(json.dumps(document, indent=2) + "\n")
    return document


def layers_report_section(
    bundle, inputs: torch.Tensor, labels: torch.Tensor, log: Callable[[str], None] = print
) -> tuple[str, str]:
    """(heading, trusted HTML) for report.html, computed on held-out inputs; never raises.

    The report must be written whatever happens here, so any failure becomes the section's text.
    """
    try:
        started = time.perf_counter()
        analysis = analyse_layers(
            bundle.network, bundle.frontend, bundle.class_names, inputs, labels, max_examples=REPORT_EXAMPLES
        )
        fragment = layers_fragment(analysis, layer_figures(analysis), _id_to_token(bundle.frontend))
        log(f"layer probes: {_probe_line(analysis)} ({time.perf_counter() - started:.1f} s)")
        return REPORT_HEADING, fragment
    except Exception as err:  # noqa: BLE001 - a failed analysis must not cost the user the report
        log(f"warning: the layers section of the report failed: {type(err).__name__}: {err}")
        reason = html.escape(f"{type(err).__name__}: {err}")
        return REPORT_HEADING, f'<p class="empty">Not available for this run: {reason}</p>'


def _probe_line(analysis: LayerAnalysis) -> str:
    if all(math.isnan(p.accuracy) for p in analysis.probes):
        return (f"not measured: {len(analysis.labels)} held-out examples, too few of each class to fit a probe "
                "on some and score it on others")  # fmt: skip
    return ", ".join(f"{p.name} {p.accuracy:.1%}" for p in analysis.probes)
