"""`layerwise pack` and training from shards: bounded memory, exact order, every example once per epoch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from layerwise.data import shards as shards_module
from layerwise.data.shards import ShardBatches, read_index
from layerwise.errors import InputError
from layerwise.pack import pack


@pytest.fixture(scope="module")
def packed(fashion_train, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "shards"
    pack(fashion_train, out, shard_size=64, log=lambda _: None)
    return out


def batches_of(packed: Path, batch_size: int = 32, shuffle: bool = True) -> ShardBatches:
    index = read_index(packed)
    train = [shard for shard in index["shards"] if shard["split"] == "train"]
    return ShardBatches(packed, train, batch_size, lambda x: x, shuffle=shuffle, seed=5)


def test_pack_writes_shards_an_index_and_a_stratified_split(packed):
    index = read_index(packed)
    assert index["n_train"] == 540 and index["n_val"] == 60 and len(index["class_labels"]) == 10
    assert sum(s["n"] for s in index["shards"] if s["split"] == "train") == 540
    assert max(s["n"] for s in index["shards"]) == 64
    assert index["preprocessing"]["modality"] == "image" and len(index["val_examples"]) == 60


def test_each_training_example_comes_once_per_epoch_in_batches_that_mix_shards(packed):
    batches = batches_of(packed)
    labels = [y for _, y in batches.epoch(0)]
    assert len(labels) == len(batches) == 540 // 32  # full batches only, as TensorBatches
    assert sum(len(y) for y in labels) == 32 * (540 // 32)
    first = next(iter(batches.epoch(0)))[0]
    assert len(set(first.flatten(1).sum(1).tolist())) > 20  # different images
    assert all(len(torch.unique(y)) >= 4 for y in labels)  # packed in a shuffled order: classes mixed
    assert not torch.equal(torch.cat(labels), torch.cat([y for _, y in batches.epoch(1)]))  # reshuffled


def test_a_resumed_epoch_yields_exactly_the_remaining_batches_without_reading_earlier_shards(packed, monkeypatch):
    batches = batches_of(packed)
    whole = list(batches.epoch(3))
    reads = []
    original = shards_module.load_shard
    monkeypatch.setattr(shards_module, "load_shard", lambda data, shard: reads.append(shard) or original(data, shard))
    resumed = list(batches.epoch(3, start=10))
    assert len(resumed) == len(whole) - 10
    for (x, y), (x2, y2) in zip(whole[10:], resumed, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert len(reads) < len(read_index(packed)["shards"]) - 1  # shards wholly before batch 10 are never read


def test_worker_processes_stream_the_same_batches_in_the_same_order(packed):
    batches = batches_of(packed)
    batches.augment = lambda x, generator: x + torch.randint(0, 3, x.shape, generator=generator, dtype=x.dtype)
    streamed = batches.streamed_to(torch.device("cpu"))
    assert streamed.workers == 0  # on a CPU the training threads use the cores
    streamed.workers = 2  # as on a GPU machine (without pinning: no GPU here)
    for start in (0, 5):
        alone, with_workers = list(batches.epoch(2, start)), list(streamed.epoch(2, start))
        assert len(with_workers) == len(alone) == len(batches) - start
        for (x, y), (x2, y2) in zip(alone, with_workers, strict=True):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_evaluation_batches_cover_every_example_in_order(packed):
    index = read_index(packed)
    val = [shard for shard in index["shards"] if shard["split"] == "val"]
    batches = ShardBatches(packed, val, 16, lambda x: x)
    assert sum(len(y) for _, y in batches.epoch(0)) == index["n_val"]


@pytest.mark.slow
def test_train_from_shards_writes_a_complete_run(packed, cli, tmp_path):
    code, out, err = cli("train", packed, "--out", tmp_path / "run", "--epochs", "2", "--no-progress")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert summary["steps"] == 2 * (540 // config["train"]["batch_size"])
    assert config["data"]["packed_from"].endswith("train") and config["data"]["n_train"] == 540
    assert summary["baseline"]["accuracy"] > 0.3 and (tmp_path / "run" / "report.html").is_file()


def test_pack_refuses_what_it_cannot_do_and_names_it(packed, tmp_path, fashion_train, cli):
    code, _, err = cli("pack", fashion_train, "--out", packed)
    assert code == 2 and "not an empty folder" in err
    broken = tmp_path / "broken"
    shutil.copytree(packed, broken)
    (broken / "train-00001.safetensors").unlink()
    with pytest.raises(InputError, match="train-00001.safetensors: shard listed"):
        read_index(broken)
    shutil.copytree(packed, tmp_path / "corrupt")
    (tmp_path / "corrupt" / "train-00000.safetensors").write_bytes(b"not a shard")
    code, _, err = cli("train", tmp_path / "corrupt", "--out", tmp_path / "run", "--no-progress")
    assert code == 2 and "train-00000.safetensors" in err and "not a readable shard" in err
    code, _, err = cli("pack", fashion_train, "--out", tmp_path / "s", "--task", "pretrain")
    assert code == 2 and "packing is for training data (classify, detect, fold, transcribe, generate)" in err


def test_bad_files_are_named_in_the_index_and_the_rest_is_packed(fashion_train, tmp_path, cli):
    data = tmp_path / "data"
    shutil.copytree(fashion_train, data)
    (data / "bag" / "broken.png").write_bytes(b"\x89PNG broken")
    code, out, err = cli("pack", data, "--out", tmp_path / "shards", "--shard-size", "128", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["skipped"] == 1 and summary["n_train"] + summary["n_val"] == 600
    assert "broken.png" in read_index(tmp_path / "shards")["skipped"][0]["path"]


def test_curve_asks_for_the_raw_data_not_the_shards(packed, cli, tmp_path):
    code, _, err = cli("curve", packed, "--out", tmp_path / "curve")
    assert code == 2 and "packed shards" in err


def test_a_packed_corpus_trains_to_the_weights_of_its_raw_text(cli, tiny_generate_run, tmp_path):
    # Text generation: pack tokenises once; training from the pack must be training on the text itself. The raw
    # run is the session's tiny generate run (1 epoch, batch 8, on 12 kB of fortunes).
    raw_config = json.loads((tiny_generate_run / "config.json").read_text())
    corpus = Path(raw_config["data"]["source"])
    code, _, err = cli("pack", corpus, "--out", tmp_path / "packed")  # the task is detected from the text
    assert code == 0, err
    index = json.loads((tmp_path / "packed" / "index.json").read_text())
    assert index["task"] == "generate" and index["n_train"] > 5 * index["n_val"] > 0
    args = ["--epochs", "1", "--batch-size", "8", "--no-progress"]
    code, _, err = cli("train", tmp_path / "packed", "--out", tmp_path / "from_pack", *args)
    assert code == 0, err
    runs = (tiny_generate_run, tmp_path / "from_pack")
    raw, from_pack = (load_file(str(run / "model.safetensors")) for run in runs)
    assert raw.keys() == from_pack.keys() and all(torch.equal(raw[k], from_pack[k]) for k in raw)
    configs = [json.loads((run / "config.json").read_text()) for run in runs]
    for key in ("n_train", "n_val", "fingerprint", "n_train_bytes"):
        assert configs[0]["data"][key] == configs[1]["data"][key], key
    assert configs[1]["data"]["packed_from"] == str(corpus)
    metrics = [json.loads((run / "metrics.json").read_text()) for run in runs]
    assert metrics[0]["metrics"]["bits_per_byte"] == metrics[1]["metrics"]["bits_per_byte"]
    assert metrics[0]["baseline"]["bits_per_byte"] == pytest.approx(metrics[1]["baseline"]["bits_per_byte"])
    # Where raw text is read (evaluate, pack), a pack is refused with the text it came from.
    for command in (
        ("evaluate", tiny_generate_run, tmp_path / "packed"),
        ("pack", tmp_path / "packed", "--out", tmp_path / "p2"),
    ):
        code, _, err = cli(*command)
        assert code == 2 and "packed examples" in err and str(corpus) in err, err
    # A token file cut short is named, not read past its end.
    tokens = tmp_path / "packed" / "train.tokens"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    code, _, err = cli("train", tmp_path / "packed", "--out", tmp_path / "cut", *args)
    assert code == 2 and "train.tokens" in err and "pack it again" in err
