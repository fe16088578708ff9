"""Unit tests for the self-contained HTML report (layerwise/report/html.py)."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import replace
from html.parser import HTMLParser

import pytest
from PIL import Image

from layerwise.report import Example, ReportData, per_class_metrics, render_report, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["cat", "dog", "bird"]
# rows = true class, cols = predicted
CONFUSION = [
    [5, 2, 1],  # cat:  8 true, 5 right
    [1, 6, 1],  # dog:  8 true, 6 right
    [0, 3, 4],  # bird: 7 true, 4 right
]
# Hand computation: precision = diag / column sum, recall = diag / row sum.
EXPECTED = {
    "cat": {"precision": 5 / 6, "recall": 5 / 8, "support": 8},
    "dog": {"precision": 6 / 11, "recall": 6 / 8, "support": 8},
    "bird": {"precision": 4 / 6, "recall": 4 / 7, "support": 7},
}
SCRIPT_TEXT = "great product <script>alert('pwned')</script> & more"


def tiny_png() -> bytes:
    image = Image.new("RGB", (8, 8), (200, 30, 30))
    image.putpixel((3, 3), (0, 0, 255))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_data(**overrides) -> ReportData:
    data = ReportData(
        title="layerwise run: <pets>",
        summary={"task": "classification", "model": "resnet-tiny", "epochs": "3"},
        history=[
            {"epoch": 1, "train_loss": 1.05, "val_loss": 0.98, "val_accuracy": 0.52, "lr": 1e-3},
            {"epoch": 2, "train_loss": 0.71, "val_loss": 0.80, "val_accuracy": 0.61, "lr": 5e-4},
            {"epoch": 3, "train_loss": 0.55, "val_loss": 0.77, "val_accuracy": 0.652, "lr": 1e-4},
        ],
        class_names=CLASSES,
        confusion=CONFUSION,
        metrics={"accuracy": 15 / 23, "macro_f1": 0.64},
        baseline={"model": "logistic regression on 14x14 pixels", "accuracy": 0.55},
        verdict="The deep model beats the classical baseline by 10.2 points.",
        examples=[
            Example("data/cat/001.png", "cat", "dog", 0.71, preview_png=tiny_png()),
            Example("reviews.csv:17", "dog", "bird", 0.55, text=SCRIPT_TEXT),
        ],
        problems=[{"path": "data/dog/broken.jpg", "reason": "cannot identify image file"}],
    )
    return replace(data, **overrides)


class _Collector(HTMLParser):
    """Collects tag attributes and the text cells of the per-class table."""

    def __init__(self) -> None:
        super().__init__()
        self.attrs: list[tuple[str, dict[str, str | None]]] = []
        self.per_class_rows: list[list[str]] = []
        self._in_per_class = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.attrs.append((tag, attributes))
        if tag == "table" and attributes.get("id") == "per-class":
            self._in_per_class = True
        elif self._in_per_class and tag == "tr":
            self.per_class_rows.append([])
        elif self._in_per_class and tag == "td":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_per_class = False
        elif tag == "td" and self._cell is not None:
            self.per_class_rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> _Collector:
    collector = _Collector()
    collector.feed(page)
    collector.close()
    return collector


@pytest.fixture(scope="module")
def page() -> str:
    return render_report(make_data())


def test_page_is_html_with_sections_in_order(page):
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    assert "<style>" in page and "<title>layerwise run: &lt;pets&gt;</title>" in page
    ids = ["result", "training", "confusion", "classes", "examples", "problems"]
    positions = [page.index(f'id="{section_id}"') for section_id in ids]
    assert positions == sorted(positions)
    assert page.index('<table class="summary">') < positions[0]


def test_no_external_resources(page):
    for tag, attrs in parse(page).attrs:
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert not re.match(r"\s*(https?:)?//", value), f"<{tag} {name}={value[:60]}>"
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()


def test_every_img_is_an_inline_png(page):
    images = [attrs for tag, attrs in parse(page).attrs if tag == "img"]
    # training curves + confusion matrix + the one example preview
    assert len(images) == 3
    prefix = "data:image/png;base64,"
    for attrs in images:
        src = attrs["src"]
        assert src.startswith(prefix)
        payload = base64.b64decode(src[len(prefix) :], validate=True)
        assert payload.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(payload)) as image:
            assert image.format == "PNG" and image.size[0] > 0
    assert tiny_png() in [base64.b64decode(a["src"][len(prefix) :]) for a in images]


def test_user_text_is_escaped(page):
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt; &amp; more" in page


def test_long_text_snippet_is_truncated():
    long_text = "word " * 400  # 2000 characters
    data = make_data(examples=[Example("long.txt", "cat", "dog", 0.9, text=long_text)])
    snippet = re.search(r'<pre class="snippet">(.*?)</pre>', render_report(data), re.S).group(1)
    assert 250 <= len(snippet) <= 310 and snippet.endswith("…")


def test_per_class_numbers_match_hand_computation(page):
    rows = {row[0]: row for row in parse(page).per_class_rows if row}
    for name, expected in EXPECTED.items():
        _, precision, recall, f1, support = rows[name]
        p, r = expected["precision"], expected["recall"]
        assert float(precision) == pytest.approx(p, abs=5e-4)
        assert float(recall) == pytest.approx(r, abs=5e-4)
        assert float(f1) == pytest.approx(2 * p * r / (p + r), abs=5e-4)
        assert int(support) == expected["support"]
    assert rows["cat"][1:3] == ["0.833", "0.625"]


def test_per_class_metrics_guards_zero_division():
    # class 2 is never predicted and never occurs; class 1 is never predicted
    m = per_class_metrics([[3, 0, 0], [2, 0, 0], [0, 0, 0]])
    assert m["precision"].tolist() == pytest.approx([0.6, 0.0, 0.0])
    assert m["recall"].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert m["f1"].tolist() == pytest.approx([0.75, 0.0, 0.0])
    assert m["support"].tolist() == [3, 2, 0]


def _headline_class(page: str) -> str:
    return re.search(r'<div class="headline ([\w-]+)">', page).group(1)


def test_classical_win_is_styled_differently(page):
    classical = render_report(
        make_data(
            baseline={"model": "logistic regression", "accuracy": 0.80},
            verdict="The classical baseline beats the deep model by 14.8 points.",
        )
    )
    assert _headline_class(page) == "deep-wins"
    assert _headline_class(classical) == "classical-wins"
    assert "Classical baseline wins by 14.8 points" in classical
    assert "Deep model wins by 10.2 points" in page
    # the stylesheet really gives the two outcomes different looks
    assert ".headline.classical-wins" in classical and ".headline.deep-wins" in classical
    assert _headline_class(render_report(make_data(baseline={}))) == "no-baseline"


def test_edge_cases_render():
    empty = render_report(make_data(history=[], examples=[], problems=[], baseline={}))
    assert "No training history was recorded." in empty
    assert "No classical baseline was run" in empty
    assert empty.count("<img") == 1  # only the confusion matrix

    one_epoch = render_report(make_data(history=[{"epoch": 1, "train_loss": 0.9}]))
    assert one_epoch.count("<img") == 3

    problems = [{"path": f"bad/{i}.jpg", "reason": "truncated"} for i in range(1000)]
    many = render_report(make_data(problems=problems))
    assert "bad/199.jpg" in many and "bad/200.jpg" not in many
    assert "800 more not shown" in many


def test_many_classes_and_extra_sections():
    n = 30
    names = [f"class ${i}$" for i in range(n)]  # '$' must not trip matplotlib mathtext
    confusion = [[10 if i == j else 1 for j in range(n)] for i in range(n)]
    extra = [("Shift <check>", "<p id='extra'>trusted fragment</p>")]
    page = render_report(make_data(class_names=names, confusion=confusion, metrics={}, extra_sections=extra))
    assert page.count("class $29$") == 1  # per-class table row
    assert "<h2>Shift &lt;check&gt;</h2>" in page and "<p id='extra'>trusted fragment</p>" in page
    assert page.index("trusted fragment") > page.index('id="problems"')
    # no accuracy in metrics: derived from the confusion matrix (10 of 39 per row)
    assert f"{100 * 10 / 39:.1f}%" in page


def test_invalid_inputs_raise_actionable_errors():
    with pytest.raises(ValueError, match="square 3x3"):
        make_data(confusion=[[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="must be PNG bytes"):
        Example("x.jpg", "cat", "dog", 0.5, preview_png=b"\xff\xd8\xff\xe0 jpeg")


def test_write_report_is_atomic_and_complete(tmp_path):
    target = tmp_path / "run" / "report.html"
    assert write_report(target, make_data()) == target
    assert target.read_text(encoding="utf-8") == render_report(make_data())
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]  # no temp file left
