"""Report sections of the fold task on synthetic chains: a random-walk Cα trace and a noisy copy as its prediction."""

import base64
import io
import re
import time

import numpy as np
import pytest
from PIL import Image
from scipy.stats import pearsonr

from layerwise.report.fold_sections import _contact_rgb, distance_map_png, fold_sections, pairwise_distances

HEADINGS = [
    "Structure metrics per chain",
    "Predicted vs true contact maps",
    "Superposed Cα traces",
    "Confidence: pLDDT vs true lDDT",
]
IMAGE = re.compile(r'<img class="figure" src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def random_walk(length: int, rng: np.random.Generator) -> np.ndarray:
    """(L, 3) Cα trace with 3.8 Å steps in random directions."""
    steps = rng.normal(size=(length, 3))
    return np.cumsum(3.8 * steps / np.linalg.norm(steps, axis=1, keepdims=True), axis=0)


def make_chain(name: str, length: int = 60, seed: int = 0, gap: slice = slice(20, 26)) -> dict:
    rng = np.random.default_rng(seed)
    true = random_walk(length, rng)
    predicted = true + rng.normal(scale=1.5, size=true.shape)
    mask = np.ones(length, bool)
    mask[gap] = False
    error = np.linalg.norm(predicted - true, axis=1)
    lddt = np.where(mask, np.clip(1 - error / 4, 0, 1), np.nan)  # a stand-in that falls with the error
    plddt = np.clip(100 * (1 - error / 4) + rng.normal(scale=10, size=length), 0, 100)
    metrics = {"lddt_ca": 0.61, "rmsd": 2.5, "gdt_ts": 0.55, "tm_score": 0.42}
    return {"name": name, "sequence": "A" * length, "true": true, "predicted": predicted, "mask": mask,
            "plddt": plddt, "lddt": lddt, "metrics": metrics}  # fmt: skip


def open_png(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.format == "PNG"
    return image


def images(fragment: str) -> list[Image.Image]:
    return [open_png(base64.b64decode(data)) for data in IMAGE.findall(fragment)]


@pytest.fixture(scope="module")
def chains() -> list[dict]:
    return [make_chain("<b>x</b>", seed=0), make_chain("1abc_A", length=45, seed=1, gap=slice(0, 5))]


@pytest.fixture(scope="module")
def sections(chains) -> list[tuple[str, str]]:
    return fold_sections(chains, baselines={"helix": {"lddt_ca": 0.2, "rmsd": 9.0}, "<i>t</i>": {"tm_score": 0.3}})


def test_distance_map_png_with_and_without_true():
    chain = make_chain("a")
    predicted = pairwise_distances(chain["predicted"])
    true = pairwise_distances(np.where(chain["mask"][:, None], chain["true"], np.nan))
    alone = open_png(distance_map_png(predicted))
    beside = open_png(distance_map_png(predicted, true, title="chain $a$"))
    assert beside.width > 2 * alone.width  # three panels against one
    assert np.isnan(true[20, 0]) and np.isnan(true[0, 20]) and not np.isnan(true[0, 19])


def test_contact_image_puts_predicted_above_and_true_below_the_diagonal():
    predicted = np.array([[0.0, 5.0, 9.0], [5.0, 0.0, 20.0], [9.0, 20.0, 0.0]])
    true = np.array([[0.0, 9.0, 7.0], [9.0, 0.0, np.nan], [7.0, np.nan, 0.0]])
    rgb = _contact_rgb(predicted, true)
    white, red, green, grey = (1.0, 1.0, 1.0), (0.75, 0.22, 0.17), (0.18, 0.52, 0.25), (0.84, 0.85, 0.87)
    expected = [[green, red, white], [white, green, white], [green, grey, green]]
    np.testing.assert_allclose(rgb, np.array(expected))


def test_distance_map_png_is_fast_for_long_chains():
    rng = np.random.default_rng(0)
    true = random_walk(1000, rng)
    predicted = pairwise_distances(true + rng.normal(size=true.shape))
    start = time.perf_counter()
    open_png(distance_map_png(predicted, pairwise_distances(true)))
    seconds = time.perf_counter() - start
    print(f"distance_map_png, L=1000, with true: {seconds:.2f} s")
    assert seconds < 20  # generous: the test machines are shared; ~1 s is typical


def test_fold_sections_headings_and_figures(sections):
    assert [heading for heading, _ in sections] == HEADINGS
    maps, traces, confidence = (fragment for _, fragment in sections[1:])
    assert len(images(maps)) == 2 and len(images(traces)) == 2
    assert len(images(confidence)) == 2  # the scatter and the profiles along the sequence
    assert "lDDT-Cα 0.610" in maps


def test_fold_sections_escapes_names(sections):
    text = "".join(fragment for _, fragment in sections)
    assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;" in text
    assert "<i>t</i>" not in text and "baseline: &lt;i&gt;t&lt;/i&gt;" in text


def test_metrics_table(sections, chains):
    table = sections[0][1]
    assert "<td>60</td><td>54</td><td>0.610</td><td>2.50</td><td>0.550</td><td>0.420</td>" in table
    assert f"<td>{np.mean(chains[0]['plddt']):.1f}</td>" in table
    assert "mean of 2 chains" in table
    assert "baseline: helix</th><td></td><td></td><td>0.200</td><td>9.00</td><td>—</td>" in table


def test_pearson_in_caption_matches_scipy(sections, chains):
    x = np.concatenate([c["plddt"][c["mask"]] / 100 for c in chains])
    y = np.concatenate([c["lddt"][c["mask"]] for c in chains])
    r = pearsonr(x, y).statistic
    assert f"over {len(x)} residues of 2 chains: Pearson r = {r:.2f}" in sections[3][1]


def test_degenerate_chains_do_not_crash():
    lonely = make_chain("one known", length=30, seed=2)
    lonely["mask"] = np.zeros(30, bool)
    lonely["mask"][7] = True
    lonely["lddt"] = np.full(30, np.nan)  # one residue has no neighbours: lDDT undefined
    lonely["metrics"] = {"lddt_ca": float("nan"), "rmsd": 0.0, "gdt_ts": 1.0, "tm_score": 1.0}
    sections = fold_sections([lonely])
    assert [heading for heading, _ in sections] == HEADINGS
    assert "Pearson r = undefined" in sections[3][1]
    assert "lDDT-Cα —" in sections[1][1]
    assert all(images(fragment) for _, fragment in sections[1:])


def test_figures_stop_at_six_chains_but_the_table_lists_all():
    many = [make_chain(f"c{i}", length=12, seed=i, gap=slice(3, 4)) for i in range(8)]
    sections = fold_sections(many)
    assert sum(f"<th>c{i}</th>" in sections[0][1] for i in range(8)) == 8
    assert len(images(sections[1][1])) == 6
    assert "first 6 of 8 chains" in sections[0][1]


def test_wrong_shape_names_the_chain():
    chain = make_chain("bad")
    chain["plddt"] = chain["plddt"][:-1]
    with pytest.raises(ValueError, match="'bad'.*'plddt' has shape \\(59,\\), expected \\(60,\\)"):
        fold_sections([chain])
