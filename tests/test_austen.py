"""Jane Austen's novels read from Debian's r-cran-janeaustenr (R's lazy-load database) without R."""

import gzip
import shutil
import struct
import sys
import zlib
from pathlib import Path

import pytest

from layerwise.data import austen
from layerwise.data.austen import (
    AUSTEN_NOVELS,
    JANEAUSTENR_ENV,
    find_janeaustenr,
    prepare_austen,
    read_austen_novels,
)
from layerwise.data.datasets import MARKER_NAME, DatasetUnavailable


def _installed() -> Path | None:
    try:
        return find_janeaustenr()
    except DatasetUnavailable:
        return None


JANEAUSTENR = _installed()
needs_janeaustenr = pytest.mark.skipif(
    JANEAUSTENR is None, reason="needs r-cran-janeaustenr: run scripts/setup.sh (unpacks it into .venv)"
)

TITLES = [
    "Sense & Sensibility",
    "Pride & Prejudice",
    "Mansfield Park",
    "Emma",
    "Northanger Abbey",
    "Persuasion",
]
# Each novel's first sentence, so a novel filed under the wrong title is caught.
OPENINGS = {
    "Sense & Sensibility": "The family of Dashwood had long been settled in Sussex",
    "Pride & Prejudice": "It is a truth universally acknowledged",
    "Mansfield Park": "About thirty years ago Miss Maria Ward",
    "Emma": "Emma Woodhouse, handsome, clever, and rich",
    "Northanger Abbey": "No one who had ever seen Catherine Morland in her infancy",
    "Persuasion": "Sir Walter Elliot, of Kellynch Hall",
}


@pytest.fixture(scope="session")
def novels() -> dict[str, str]:
    return read_austen_novels(JANEAUSTENR)


@pytest.fixture
def package_copy(tmp_path) -> Path:
    """A writable copy of the package's lazy-load database, to damage."""
    copy = tmp_path / "janeaustenr"
    shutil.copytree(JANEAUSTENR / "data", copy / "data")
    return copy


@needs_janeaustenr
def test_six_novels_in_publication_order(novels):
    assert list(novels) == TITLES
    for title, text in novels.items():
        assert len(text) > 300_000, title


@needs_janeaustenr
def test_each_novel_opens_with_its_first_sentence(novels):
    pride = novels["Pride & Prejudice"]
    assert pride.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n")  # lines joined with "\n"
    assert pride.index("It is a truth universally acknowledged") < 100
    for title, opening in OPENINGS.items():
        start = " ".join(novels[title][:3000].split())  # sentences wrap across lines
        assert opening in start, title
    assert "£" in novels["Mansfield Park"]  # UTF-8 strings decode, not only ASCII


@needs_janeaustenr
def test_prepare_austen_writes_six_files_and_reuses_them(tmp_path, novels, monkeypatch):
    folder = prepare_austen(tmp_path)
    assert folder == tmp_path / "austen"
    files = sorted(p.name for p in folder.glob("*.txt"))
    assert files == [f"{novel.slug}.txt" for novel in AUSTEN_NOVELS]
    assert files[0] == "01_sense_and_sensibility.txt"
    for novel in AUSTEN_NOVELS:
        assert (folder / f"{novel.slug}.txt").read_bytes() == novels[novel.title].encode("utf-8")
    assert (folder / MARKER_NAME).is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def must_not_read(package_dir):
        raise AssertionError("a second call must reuse the files, not read the package again")

    monkeypatch.setattr(austen, "read_austen_novels", must_not_read)
    assert prepare_austen(tmp_path) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


@needs_janeaustenr
def test_truncated_rdb_names_the_file(package_copy, tmp_path):
    rdb = package_copy / "data" / "Rdata.rdb"
    rdb.write_bytes(rdb.read_bytes()[: rdb.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"Rdata\.rdb is truncated"):
        read_austen_novels(package_copy)
    with pytest.raises(ValueError, match=r"Rdata\.rdb"):
        prepare_austen(tmp_path / "out", package_dir=package_copy)
    assert not (tmp_path / "out" / "austen").exists()  # nothing half-written looks complete


@needs_janeaustenr
def test_damaged_rdb_names_the_file(package_copy):
    rdb = package_copy / "data" / "Rdata.rdb"
    data = bytearray(rdb.read_bytes())
    data[1000:1400] = bytes(400)  # inside the first record's zlib stream
    rdb.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"Rdata\.rdb.*does not decompress"):
        read_austen_novels(package_copy)


@needs_janeaustenr
def test_damaged_index_names_the_file(package_copy):
    (package_copy / "data" / "Rdata.rdx").write_bytes(gzip.compress(b"not an R serialization"))
    with pytest.raises(ValueError, match=r"Rdata\.rdx holds no R XDR serialization"):
        read_austen_novels(package_copy)


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv(JANEAUSTENR_ENV, raising=False)
    monkeypatch.setattr(austen, "JANEAUSTENR_SYSTEM_DIR", tmp_path / "no-system-r")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "no-venv"))
    with pytest.raises(DatasetUnavailable, match="r-cran-janeaustenr"):
        find_janeaustenr()
    with pytest.raises(DatasetUnavailable, match="r-cran-janeaustenr"):
        prepare_austen(tmp_path / "out")
    monkeypatch.setenv(JANEAUSTENR_ENV, str(tmp_path))
    with pytest.raises(DatasetUnavailable, match=JANEAUSTENR_ENV):
        find_janeaustenr()


# ---------------------------------------------------------------------------------------------
# A tiny lazy-load database written by an independent encoder of R's XDR serialization, so the
# reader is checked without the Debian package: version 2 and 3 headers, NA and Latin-1 strings,
# the names attribute as a tagged pairlist, a repeated symbol written as a reference.

UTF8, LATIN1 = 1 << 3, 1 << 2  # CHARSXP encoding flags, in the levels field (bits 12+)
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10


class _RWriter:
    def __init__(self, version: int) -> None:
        self.version = version
        self.symbols: list[str] = []

    def serialize(self, body: bytes) -> bytes:
        header = b"X\n" + struct.pack(">iii", self.version, 0x040201, 0x030500)
        if self.version == 3:
            header += struct.pack(">i", 5) + b"UTF-8"
        return header + body

    def chars(self, text: str | None, levels: int = UTF8) -> bytes:
        if text is None:
            return struct.pack(">ii", 9, -1)
        raw = text.encode("latin-1" if levels == LATIN1 else "utf-8")
        return struct.pack(">ii", 9 | levels << 12, len(raw)) + raw

    def symbol(self, name: str) -> bytes:
        if name in self.symbols:  # R writes a symbol once, then refers to it by 1-based index
            return struct.pack(">i", (self.symbols.index(name) + 1) << 8 | 255)
        self.symbols.append(name)
        return struct.pack(">i", 1) + self.chars(name)

    def names(self, names: list[str]) -> bytes:
        pairlist = struct.pack(">i", 2 | HAS_TAG) + self.symbol("names") + self.strings(names)
        return pairlist + struct.pack(">i", 254)  # the pairlist's CDR: NULL

    def strings(self, items: list[bytes | str], names: list[str] | None = None) -> bytes:
        encoded = [item if isinstance(item, bytes) else self.chars(item) for item in items]
        return self._vector(16, b"".join(encoded), len(items), names)

    def integers(self, values: list[int], sexp_type: int = 13) -> bytes:
        return self._vector(sexp_type, struct.pack(f">{len(values)}i", *values), len(values), None)

    def generic_list(self, items: list[bytes], names: list[str]) -> bytes:
        return self._vector(19, b"".join(items), len(items), names)

    def _vector(self, sexp_type: int, body: bytes, length: int, names: list[str] | None) -> bytes:
        flags = sexp_type | (HAS_ATTR if names else 0)
        return struct.pack(">ii", flags, length) + body + (self.names(names) if names else b"")


def _write_lazy_load_db(folder: Path, lines: dict[str, list], version: int) -> None:
    """``folder/data/Rdata.rdx`` + ``.rdb`` holding one character vector per variable."""
    records, places = b"", {}
    for name, items in lines.items():
        data = _RWriter(version).serialize(_RWriter(version).strings(items))
        record = struct.pack(">I", len(data)) + zlib.compress(data)
        places[name] = [len(records), len(record)]
        records += record
    writer = _RWriter(version)
    variables = writer.generic_list([writer.integers(place) for place in places.values()], list(places))
    index = writer.generic_list(
        [variables, writer.generic_list([], []), writer.integers([1], sexp_type=10)],  # compressed = TRUE
        ["variables", "references", "compressed"],
    )
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "Rdata.rdb").write_bytes(records)
    (folder / "data" / "Rdata.rdx").write_bytes(gzip.compress(writer.serialize(index)))


@pytest.mark.parametrize("version", [2, 3])
def test_reads_an_independently_written_database(tmp_path, version):
    writer = _RWriter(version)
    lines = {novel.variable: [novel.title.upper(), "", f"Chapter {i}"] for i, novel in enumerate(AUSTEN_NOVELS)}
    lines["emma"] = ["EMMA", None, writer.chars("Caf\u00e9 au lait", LATIN1), "na\u00efve \u2014 \u00a3"]
    lines["unrelated"] = ["not a novel"]
    _write_lazy_load_db(tmp_path, lines, version)

    novels = read_austen_novels(tmp_path)
    assert list(novels) == TITLES
    assert novels["Persuasion"] == "PERSUASION\n\nChapter 5"
    assert novels["Emma"] == "EMMA\n\nCaf\u00e9 au lait\nna\u00efve \u2014 \u00a3"  # NA -> ""
    folder = prepare_austen(tmp_path / "out", package_dir=tmp_path)
    assert (folder / "04_emma.txt").read_text(encoding="utf-8") == novels["Emma"]
