"""Behaviour: `layerwise explain` and `layerwise layers` on small real runs, the Adebayo et al. (2018) sanity
checks, and every figure of report.html / layers.html loading in headless Chromium."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TORCH_THREADS
from scipy.stats import spearmanr

from layerwise.cli import app
from layerwise.explain.stages import receptive_fields
from layerwise.models import create_model, list_models
from layerwise.models.registry import model_entry

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Appended to a copy of a page: after load, the body records how many <img> there are and which failed.
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((img) => !(img.complete && img.naturalWidth > 0));
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-broken", String(broken.length));
  document.body.setAttribute("data-broken-alt", broken.map((img) => img.alt).join(" | "));
});
</script>"""


def train(data: Path, run: Path, *options: str) -> Path:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["train", str(data), "--out", str(run), "--no-progress", *options])
    assert result.exit_code == 0, result.stderr
    return run


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, fashion_train) -> Path:
    torch.set_num_threads(TORCH_THREADS)  # module-scoped: set up before conftest's per-test fixture
    return train(fashion_train, tmp_path_factory.mktemp("explain") / "fashion", "--epochs", "6")


@pytest.fixture(scope="module")
def some_images(fashion_test) -> list[Path]:
    """Two test images of each of five classes."""
    classes = sorted(p for p in fashion_test.iterdir() if p.is_dir())[:5]
    return [path for folder in classes for path in sorted(folder.glob("*.png"))[:2]]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- explain


def test_explain_writes_a_picture_per_input_and_method(cli, image_run, some_images, tmp_path) -> None:
    out = tmp_path / "why"
    code, stdout, err = cli("explain", image_run, *some_images[:3], "--out", out)
    assert code == 0, err
    document = read_json(out / "explanations.json")
    assert [r["path"] for r in document["explanations"]] == [str(p) for p in some_images[:3]]
    for record in document["explanations"]:
        assert set(record["files"]) == {"ig", "gradcam"}
        for name in record["files"].values():
            assert (out / name).read_bytes().startswith(b"\x89PNG")
            assert name in stdout
        assert record["target"] == record["predicted"]  # default: explain the predicted class


def test_explain_json_gives_raw_scores_of_the_input_shape(cli, image_run, some_images, tmp_path) -> None:
    code, stdout, err = cli("explain", image_run, some_images[0], "--out", tmp_path, "--json", "--method", "ig")
    assert code == 0, err
    record = json.loads(stdout)["explanations"][0]
    assert "gradcam" not in record and set(record["files"]) == {"ig"}
    scores = np.array(record["ig"]["scores"])
    assert record["ig"]["shape"] == [1, 28, 28] and scores.shape == (1, 28, 28)
    # completeness: IG scores sum to f(x) - f(baseline); the reported gap is small against the scores
    assert abs(record["ig"]["convergence_delta"]) < 0.05 * np.abs(scores).sum()


def test_explain_target_class_and_bad_target(cli, image_run, some_images, tmp_path) -> None:
    classes = read_json(image_run / "config.json")["class_labels"]
    code, stdout, err = cli("explain", image_run, some_images[0], "--out", tmp_path, "--target", classes[-1], "--json")
    assert code == 0, err
    record = json.loads(stdout)["explanations"][0]
    assert record["target"] == classes[-1] and record["gradcam"]["shape"] == [28, 28]
    code, _, err = cli("explain", image_run, some_images[0], "--out", tmp_path, "--target", "no-such-class")
    assert code == 2 and "no-such-class" in err and classes[0] in err
    code, _, err = cli("explain", image_run, some_images[0], "--out", tmp_path, "--method", "saliency")
    assert code == 2 and "--method" in err


# ----------------------------------------------------------------------------- sanity checks (Adebayo et al.)


def attributions(network, x, targets, method) -> np.ndarray:
    from layerwise.explain import attribute

    return np.stack([a.scores.flatten().numpy() for a in attribute(network, x, targets, method)])


def median_rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Median over examples of Spearman's rho between two attribution maps; a constant map counts as 0."""
    rhos = []
    for u, v in zip(a, b, strict=True):
        rho = 0.0 if u.std() == 0 or v.std() == 0 else spearmanr(u, v).statistic
        rhos.append(rho)
    return float(np.median(rhos))


@pytest.fixture(scope="module")
def trained_and_random(image_run, some_images):
    """The trained network, the same architecture with fresh random weights, and model inputs."""
    import layerwise
    from layerwise.data.sources import discover_files

    bundle = layerwise.load(image_run)
    tensors, _, _ = bundle.frontend.decode_all(discover_files(some_images, "image").examples)
    torch.manual_seed(1234)
    random_net = create_model(bundle.config["model"]["name"], **bundle.config["model"]["config"]).eval()
    return bundle.network.eval(), random_net, bundle.frontend.model_input(tensors)


def test_attributions_change_when_the_weights_are_randomised(trained_and_random) -> None:
    trained, random_net, x = trained_and_random
    with torch.no_grad():
        predicted = trained(x).argmax(1)
    for method, limit in (("ig", 0.3), ("gradcam", 0.5)):
        own = attributions(trained, x, predicted, method)
        rho = median_rank_correlation(own, attributions(random_net, x, predicted, method))
        assert rho < limit, f"{method}: rank correlation {rho:.2f} between trained and random-weight attributions"
        # and the same network gives the same attributions: the low correlation is not noise
        assert median_rank_correlation(own, attributions(trained, x, predicted, method)) > 0.99


def test_attributions_differ_between_target_classes(trained_and_random) -> None:
    """The predicted class against the least likely one: IG flips sign on the evidence (rho about -0.6 on
    this run); Grad-CAM finds the predicted class's evidence and (nearly) none for the least likely one."""
    trained, _, x = trained_and_random
    with torch.no_grad():
        logits = trained(x)
    predicted, least_likely = logits.argmax(1), logits.argmin(1)
    for method, limit in (("ig", 0.3), ("gradcam", 0.5)):
        own = attributions(trained, x, predicted, method)
        assert (own.std(1) > 0).mean() > 0.8  # the predicted class's maps are not blank
        rho = median_rank_correlation(own, attributions(trained, x, least_likely, method))
        assert rho < limit, f"{method}: rank correlation {rho:.2f} between two target classes"


# ----------------------------------------------------------------------------- layers


def test_layers_probes_every_stage(cli, image_run, fashion_test, tmp_path) -> None:
    out = tmp_path / "layers"
    code, stdout, err = cli("layers", image_run, fashion_test, "--out", out, "--json")
    assert code == 0, err
    document = json.loads(stdout)
    assert document == read_json(out / "layers.json")
    probes = document["probes"]
    assert [p["stage"] for p in probes] == ["input", "stem", "stage1", "stage2"]  # convnet_s's named stages
    assert [p["depth"] for p in probes] == [0, 1, 2, 3]
    assert all(0 <= p["probe_accuracy"] <= 1 for p in probes)
    assert document["n_fit"] + document["n_score"] == 200  # 20 test images per class, all analysed
    # the deepest stage separates the classes far better than chance (10 classes)
    assert probes[-1]["probe_accuracy"] > 0.5
    for stem in ("probes", "filters", "patches_stem", "patches_stage1", "patches_stage2", "projection"):
        assert (out / f"{stem}.png").read_bytes().startswith(b"\x89PNG")
    assert "stage2" in (out / "layers.html").read_text()


def test_receptive_fields_grow_with_depth() -> None:
    torch.manual_seed(0)
    fields = receptive_fields(create_model("convnet_s", in_channels=1, num_classes=10).eval(), (1, 28, 28))
    assert fields["stem"].size == (3, 3)  # one 3x3 convolution
    assert fields["stage1"].size == (12, 12)  # 3x3, pool 2, 3x3, 3x3: 3 + 1 + 2*2 + 2*2
    assert fields["stage2"].size[0] > fields["stage1"].size[0]


def test_the_report_has_the_layers_section(image_run) -> None:
    page = (image_run / "report.html").read_text()
    assert "What each layer learned" in page and "Not available" not in page
    for stage in ("stem", "stage1", "stage2"):
        assert f"<td>{stage}</td>" in page


# ----------------------------------------------------------------------------- generic over the registry


def frontend_and_inputs(modality: str) -> tuple[object, torch.Tensor]:
    """A real front end and 40 cached inputs for it (random images, or short texts)."""
    from layerwise.data.image import ImageFrontEnd, ImagePreprocessing
    from layerwise.data.sources import Example
    from layerwise.data.text import TextFrontEnd

    if modality == "text":
        words = "the cat sat on a mat while dogs ran past two red cars and one blue bus".split()
        rng = np.random.default_rng(0)
        texts = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(40)]
        examples = [Example(origin=f"line {i}", label=None, text=t) for i, t in enumerate(texts)]
        frontend = TextFrontEnd.fit(examples)
        return frontend, frontend.decode_all(examples)[0]
    frontend = ImageFrontEnd(ImagePreprocessing(side=32, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3))
    return frontend, torch.randint(
        0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


@pytest.mark.parametrize("name", list_models(task="classify"))
def test_every_registered_model_is_explained_through_its_stages(name: str) -> None:
    """No per-model code: attributions and layer probes for every model in the registry."""
    from layerwise.explain import analyse_layers, attribute
    from layerwise.explain.draw import layer_figures

    modality = "text" if "text" in model_entry(name).modalities else "image"
    frontend, inputs = frontend_and_inputs(modality)
    torch.manual_seed(0)
    network = create_model(name, num_classes=4, **frontend.model_inputs).eval()
    x = frontend.model_input(inputs[:2])
    for method in ("ig", "gradcam"):
        for attribution in attribute(network, x, torch.tensor([0, 3]), method, getattr(frontend, "token_roles", None)):
            expected = x.shape[1:] if method == "ig" or modality == "text" else x.shape[2:]
            assert attribution.scores.shape == expected and torch.isfinite(attribution.scores).all()
    analysis = analyse_layers(network, frontend, ["a", "b", "c", "d"], inputs, np.arange(40) % 4)
    assert [p.name for p in analysis.probes] == ["input"] + [n for n, _ in network.named_stages()]
    assert len(analysis.top_inputs) == len(network.named_stages())
    figures = layer_figures(analysis)
    assert {"probes", "projection"} <= set(figures)
    assert (modality == "image") == ("filters" in figures)


# ----------------------------------------------------------------------------- every figure loads in a browser


def broken_images(page: Path, scratch: Path) -> tuple[int, int, str]:
    """Open `page` in headless Chromium; (images, broken images, alt texts of the broken ones)."""
    checked = scratch / f"checked-{page.name}"
    checked.write_text(page.read_text(encoding="utf-8").replace("</body>", IMAGE_CHECK + "</body>"))
    command = [
        CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={scratch / 'chromium'}",
        "--virtual-time-budget=10000", "--dump-dom", checked.as_uri(),
    ]  # fmt: skip
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body and "data-images" in body.group(0), f"the check script did not run in Chromium: {dom[:300]}"
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(0)))
    return int(attrs["data-images"]), int(attrs["data-broken"]), attrs.get("data-broken-alt", "")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh installs it)")
def test_every_figure_loads_in_headless_chromium(cli, image_run, fashion_test, tmp_path) -> None:
    code, _, err = cli("layers", image_run, fashion_test, "--out", tmp_path / "layers")
    assert code == 0, err
    for page, at_least in ((image_run / "report.html", 8), (tmp_path / "layers" / "layers.html", 6)):
        images, broken, alts = broken_images(page, tmp_path)
        assert images >= at_least, f"{page.name}: only {images} images"
        assert broken == 0, f"{page.name}: {broken} figure(s) did not load: {alts}"
    # the check itself sees a broken figure
    damaged = tmp_path / "damaged.html"
    damaged.write_text((image_run / "report.html").read_text().replace("base64,iVBOR", "base64,XXXX", 1))
    assert broken_images(damaged, tmp_path)[1] == 1


# ----------------------------------------------------------------------------- text and audio


def test_text_explain_highlights_tokens(cli, fortunes_run, fortunes_csv, tmp_path) -> None:
    run = fortunes_run
    text = "The computer crashed <again> & the program lost my files"
    code, stdout, err = cli("explain", run, text, "--out", tmp_path / "why", "--json")
    assert code == 0, err
    record = json.loads(stdout)["explanations"][0]
    assert "computer" in record["tokens"] and "[PAD]" not in record["tokens"] and "[CLS]" not in record["tokens"]
    for method in ("ig", "gradcam"):
        assert record[method]["shape"] == [len(record["tokens"])]
        page = (tmp_path / "why" / record["files"][method]).read_text()
        assert page.count('class="tok"') == len(record["tokens"])
        assert "&lt;" in page and "<again>" not in page  # the text is escaped
    assert "What each layer learned" in (run / "report.html").read_text()
    code, stdout, err = cli(
        "layers", run, fortunes_csv, "--out", tmp_path / "layers", "--json", "--max-examples", "200"
    )
    assert code == 0, err
    assert [p["stage"] for p in json.loads(stdout)["probes"]] == ["input", "embed", "block1", "block2"]
    assert "nearest in the learned embedding" in (tmp_path / "layers" / "layers.html").read_text()


def test_audio_explain_draws_over_the_spectrogram(cli, spoken_digits, tmp_path) -> None:
    run = train(spoken_digits, tmp_path / "digits", "--epochs", "3")
    clip = next((spoken_digits / "seven").glob("*.wav"))
    code, stdout, err = cli("explain", run, clip, "--out", tmp_path / "why", "--json")
    assert code == 0, err
    record = json.loads(stdout)["explanations"][0]
    n_mels, n_frames = record["gradcam"]["shape"]
    assert n_mels == 64 and n_frames > 20 and record["ig"]["shape"] == [1, n_mels, n_frames]
    assert (tmp_path / "why" / record["files"]["gradcam"]).read_bytes().startswith(b"\x89PNG")
    page = (run / "report.html").read_text()
    assert "What each layer learned" in page and "Not available" not in page


def test_a_probe_scores_only_classes_it_has_seen() -> None:
    from layerwise.explain.layers import halves, probe_accuracy

    features = np.random.default_rng(0).normal(size=(20, 10))
    one_each = np.arange(10)  # 10 held-out examples, one per class: nothing can be learned and scored
    fit, score = halves(one_each, seed=0)
    assert np.isnan(probe_accuracy(features[:10], one_each, fit, score, seed=0))
    two_each = np.repeat(np.arange(10), 2)
    fit, score = halves(two_each, seed=0)
    separable = features + 10 * np.eye(10)[two_each]  # each class lifts a feature of its own
    assert probe_accuracy(separable, two_each, fit, score, seed=0) == 1.0
