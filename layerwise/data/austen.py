"""Jane Austen's six novels, read offline from Debian's ``r-cran-janeaustenr`` package.

The package stores each novel as an R character vector (one element per line) in R's lazy-load
database: ``data/Rdata.rdx`` is a gzipped R serialization of an index (variable name -> offset
and length in ``data/Rdata.rdb``), and each ``.rdb`` record is a 4-byte big-endian length of the
uncompressed data followed by a zlib stream holding one R serialization. R itself is not needed:
``scripts/setup.sh`` unpacks the ``.deb`` with ``dpkg -x`` into ``.venv/share/debian-data``.

No maintained PyPI library reads ``.rdx``/``.rdb`` (``rdata`` parses single serializations but
pulls in pandas and xarray, ``pyreadr`` reads ``.rds``/``.RData`` only), so this module holds a
small reader for exactly the R types the package uses.
"""

import bz2
import gzip
import lzma
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerwise.data.datasets import FORMAT_VERSION, DatasetUnavailable, _build_folder, _is_complete


@dataclass(frozen=True)
class Novel:
    variable: str  # name of the R object in the package
    title: str  # as janeaustenr's austen_books() spells it
    slug: str  # file stem written by prepare_austen


# Publication order, which is also the order austen_books() uses.
AUSTEN_NOVELS: tuple[Novel, ...] = (
    Novel("sensesensibility", "Sense & Sensibility", "01_sense_and_sensibility"),
    Novel("prideprejudice", "Pride & Prejudice", "02_pride_and_prejudice"),
    Novel("mansfieldpark", "Mansfield Park", "03_mansfield_park"),
    Novel("emma", "Emma", "04_emma"),
    Novel("northangerabbey", "Northanger Abbey", "05_northanger_abbey"),
    Novel("persuasion", "Persuasion", "06_persuasion"),
)
AUSTEN_FOLDER_NAME = "austen"
JANEAUSTENR_ENV = "LAYERWISE_JANEAUSTENR"
JANEAUSTENR_SYSTEM_DIR = Path("/usr/lib/R/site-library/janeaustenr")  # where `apt-get install` puts it
# Where scripts/setup.sh unpacks the .deb (relative to the venv), so R is never installed.
JANEAUSTENR_VENV_DIR = Path("share/debian-data/usr/lib/R/site-library/janeaustenr")
# Lazy-load databases a package may hold, without the .rdx/.rdb suffix: lazy data, then internal data.
LAZY_LOAD_DATABASES: tuple[str, ...] = ("data/Rdata", "R/sysdata")
JANEAUSTENR_INSTALL_HINT = (
    "run scripts/setup.sh (it unpacks Debian's r-cran-janeaustenr into .venv/share/debian-data without R), "
    "or 'sudo apt-get install r-cran-janeaustenr', "
    f"or set {JANEAUSTENR_ENV} to an unpacked janeaustenr folder"
)
_REINSTALL = "the janeaustenr package looks damaged; unpack r-cran-janeaustenr again"


def find_janeaustenr() -> Path:
    """The installed janeaustenr R package folder (the one holding ``data/Rdata.rdx``).

    Looks at ``$LAYERWISE_JANEAUSTENR`` first, then the system R library, then the copy that
    ``scripts/setup.sh`` unpacks into the venv. Raises ``DatasetUnavailable`` with an install hint.
    """
    override = os.environ.get(JANEAUSTENR_ENV)
    if override:
        if not _has_database(Path(override)):
            raise DatasetUnavailable(
                f"{JANEAUSTENR_ENV}={override} holds no R lazy-load database "
                f"({' or '.join(db + '.rdx' for db in LAZY_LOAD_DATABASES)}); {JANEAUSTENR_INSTALL_HINT}"
            )
        return Path(override)
    candidates = (JANEAUSTENR_SYSTEM_DIR, Path(sys.prefix) / JANEAUSTENR_VENV_DIR)
    for candidate in candidates:
        if _has_database(candidate):
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    raise DatasetUnavailable(f"Jane Austen's novels (janeaustenr) not found in {searched}; {JANEAUSTENR_INSTALL_HINT}")


def _has_database(package_dir: Path) -> bool:
    return any((package_dir / f"{db}.rdx").is_file() for db in LAZY_LOAD_DATABASES)


def read_austen_novels(package_dir: Path) -> dict[str, str]:
    """Title -> full text of each novel (its lines joined with ``"\\n"``), in publication order.

    Raises ``ValueError`` naming the file if the database is truncated or damaged.
    """
    wanted = [novel.variable for novel in AUSTEN_NOVELS]
    for db in LAZY_LOAD_DATABASES:
        prefix = Path(package_dir) / db
        if not prefix.with_suffix(".rdx").is_file():
            continue
        database = LazyLoadDatabase(prefix)
        if all(name in database.names for name in wanted):
            return {novel.title: "\n".join(database.strings(novel.variable)) for novel in AUSTEN_NOVELS}
    raise DatasetUnavailable(
        f"no lazy-load database in {package_dir} holds all of {wanted}; {JANEAUSTENR_INSTALL_HINT}"
    )


def prepare_austen(dest: Path, *, package_dir: Path | None = None) -> Path:
    """Write each novel as UTF-8 ``dest/austen/<nn>_<title>.txt`` and return ``dest/austen``.

    A file holds exactly the text ``read_austen_novels`` returns. A second call finds the
    completion marker and returns at once without reading the package. ``package_dir`` defaults
    to ``find_janeaustenr()``.
    """
    final = Path(dest) / AUSTEN_FOLDER_NAME
    identity = {
        "dataset": "janeaustenr",
        "format_version": FORMAT_VERSION,
        "novels": [novel.slug for novel in AUSTEN_NOVELS],
    }
    if _is_complete(final, identity):
        return final
    source = Path(package_dir) if package_dir is not None else find_janeaustenr()
    texts = read_austen_novels(source)

    def write(staging: Path) -> dict[str, Any]:
        for novel in AUSTEN_NOVELS:
            # newline="" keeps "\n" as is on every platform.
            with open(staging / f"{novel.slug}.txt", "w", encoding="utf-8", newline="") as f:
                f.write(texts[novel.title])
        return {"source": str(source), "characters": {novel.slug: len(texts[novel.title]) for novel in AUSTEN_NOVELS}}

    _build_folder(final, identity, write)
    return final


# ---------------------------------------------------------------------------------------------
# R's lazy-load database: an index (.rdx) plus compressed serialized records (.rdb).

RECORD_LENGTH_BYTES = 4  # each .rdb record starts with the uncompressed length, big-endian uint32


class LazyLoadDatabase:
    """One ``<prefix>.rdx`` + ``<prefix>.rdb`` pair; ``strings(name)`` reads one character vector."""

    def __init__(self, prefix: Path) -> None:
        self.rdx = prefix.with_suffix(".rdx")
        self.rdb = prefix.with_suffix(".rdb")
        index = unserialize(_read_rdx(self.rdx), self.rdx)
        if not isinstance(index, RVector):
            raise ValueError(f"{self.rdx} is not an R lazy-load index; {_REINSTALL}")
        fields = index.named()
        try:
            variables = fields["variables"].named()
            # The R index stores each record's place as an integer vector c(offset, length).
            self.places = {name: (int(v.items[0]), int(v.items[1])) for name, v in variables.items()}
            self.compression = fields["compressed"].items[0]
        except (KeyError, AttributeError, IndexError, TypeError) as error:
            raise ValueError(f"{self.rdx} lacks the variables/compressed fields of an R index; {_REINSTALL}") from error

    @property
    def names(self) -> list[str]:
        return list(self.places)

    def strings(self, name: str) -> list[str]:
        """The character vector stored as ``name``; R's NA becomes ``""``."""
        value = unserialize(self._record(name), self.rdb)
        if not isinstance(value, RVector) or value.sexp_type != STRSXP:
            raise ValueError(f"{self.rdb}: {name!r} is not a character vector; {_REINSTALL}")
        return ["" if line is None else line for line in value.items]

    def _record(self, name: str) -> bytes:
        """The decompressed serialization of ``name``."""
        offset, length = self.places[name]
        with open(self.rdb, "rb") as f:
            f.seek(offset)
            record = f.read(length)
        if len(record) != length or length < RECORD_LENGTH_BYTES:
            raise ValueError(
                f"{self.rdb} is truncated: {name!r} needs bytes {offset}..{offset + length}, "
                f"the file has {self.rdb.stat().st_size}; {_REINSTALL}"
            )
        expected = int.from_bytes(record[:RECORD_LENGTH_BYTES], "big")
        data = _decompress_record(record, self.compression, self.rdb, name)
        if len(data) != expected:
            raise ValueError(
                f"{self.rdb}: {name!r} decompressed to {len(data)} bytes, its header says {expected}; {_REINSTALL}"
            )
        return data


# R's `compress` argument to makeLazyLoadDB: TRUE (1) is zlib right after the length; 2 and 3 add a
# type byte after the length naming the codec actually used (it falls back when that is smaller).
ZLIB_COMPRESSION, TYPED_COMPRESSION = 1, (2, 3)
RECORD_CODECS = {
    ord("0"): lambda data: data,  # stored uncompressed
    ord("1"): zlib.decompress,
    ord("2"): bz2.decompress,
    ord("Z"): lzma.decompress,  # xz container
}


def _decompress_record(record: bytes, compression: Any, rdb: Path, name: str) -> bytes:
    body = record[RECORD_LENGTH_BYTES:]
    try:
        if compression == ZLIB_COMPRESSION:
            return zlib.decompress(body)
        if compression in TYPED_COMPRESSION and body and body[0] in RECORD_CODECS:
            return RECORD_CODECS[body[0]](body[1:])
    except (zlib.error, OSError, lzma.LZMAError, ValueError, EOFError) as error:
        raise ValueError(f"{rdb}: the record of {name!r} does not decompress ({error}); {_REINSTALL}") from error
    raise ValueError(f"{rdb}: unsupported record compression {compression!r} for {name!r}")


def _read_rdx(path: Path) -> bytes:
    """The .rdx file's serialization; R writes it with saveRDS, gzip-compressed by default."""
    raw = path.read_bytes()
    try:
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        if raw[:3] == b"BZh":
            return bz2.decompress(raw)
        if raw[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(raw)
    except (OSError, EOFError, lzma.LZMAError, ValueError) as error:
        raise ValueError(f"{path} does not decompress ({error}); {_REINSTALL}") from error
    return raw


# ---------------------------------------------------------------------------------------------
# R's serialization format (XDR, versions 2 and 3): just the types janeaustenr's files hold.

# SEXPTYPE codes from R's Rinternals.h, and the pseudo-types serialize.c writes.
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP = 255, 254
# An item's 32-bit flags: type in the low byte, then these bits, then the "levels" (gp) field.
HAS_OBJECT_BIT, HAS_ATTR_BIT, HAS_TAG_BIT = 1 << 8, 1 << 9, 1 << 10
LEVELS_SHIFT = 12
# Encoding bits of a CHARSXP's levels.
BYTES_MASK, LATIN1_MASK, UTF8_MASK, ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6
NA_INTEGER = -(2**31)  # R's NA for integers and logicals; also a CHARSXP length of -1 means NA
LONG_LENGTH = -1  # a vector length of -1 is followed by two ints holding a 64-bit length
XDR_MAGIC = b"X\n"
REF_INDEX_SHIFT = 8  # REFSXP packs its 1-based reference-table index above the type byte


@dataclass(frozen=True)
class RVector:
    """A decoded R vector or pairlist.

    ``items`` holds ``str | None`` for character vectors, ``int | None`` for integer and logical
    vectors, ``float`` for doubles, decoded values for lists; ``None`` stands for NA.
    """

    sexp_type: int
    items: list[Any]
    attributes: dict[str, Any] = field(default_factory=dict)

    def named(self) -> dict[str, Any]:
        """Items keyed by the ``names`` attribute."""
        names = self.attributes.get("names")
        if not isinstance(names, RVector) or len(names.items) != len(self.items):
            raise ValueError("R vector has no names attribute of matching length")
        return dict(zip(names.items, self.items, strict=True))


def unserialize(data: bytes, source: Path) -> Any:
    """Decode one R serialization; errors name ``source`` (the file it came from)."""
    return _Unserializer(data, source).read()


class _Unserializer:
    def __init__(self, data: bytes, source: Path) -> None:
        self.data = data
        self.source = source
        self.pos = 0
        self.refs: list[Any] = []  # R's reference table: symbols (and environments) in order of appearance
        self.native_encoding = "utf-8"

    def read(self) -> Any:
        if self._take(2) != XDR_MAGIC:
            raise ValueError(f"{self.source} holds no R XDR serialization (expected 'X\\n'); {_REINSTALL}")
        version = self._int()
        self._int()  # R version that wrote it
        self._int()  # oldest R version that can read it
        if version == 3:
            self.native_encoding = self._take(self._int()).decode("ascii")
        elif version != 2:
            raise ValueError(f"{self.source}: unsupported R serialization version {version}")
        return self._item()

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(
                f"{self.source} is truncated: needs {n} bytes at offset {self.pos} of {len(self.data)}; {_REINSTALL}"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        length = self._int()
        if length == LONG_LENGTH:
            upper, lower = self._int(), self._int()
            length = (upper << 32) + (lower & 0xFFFFFFFF)
        return length

    def _item(self) -> Any:
        flags = self._int()
        sexp_type = flags & 0xFF
        has_attr = bool(flags & HAS_ATTR_BIT)
        if sexp_type == NILVALUE_SXP:
            return None
        if sexp_type == REFSXP:
            index = flags >> REF_INDEX_SHIFT or self._int()
            if not 0 < index <= len(self.refs):
                raise ValueError(f"{self.source}: reference {index} to an unknown object; {_REINSTALL}")
            return self.refs[index - 1]
        if sexp_type == SYMSXP:
            name = self._item()  # a CHARSXP
            self.refs.append(name)
            return name
        if sexp_type == LISTSXP:
            return self._pairlist(flags)
        if sexp_type == CHARSXP:
            return self._charsxp(flags >> LEVELS_SHIFT)
        if sexp_type in (LGLSXP, INTSXP):
            n = self._length()
            items = [None if v == NA_INTEGER else v for v in struct.unpack(f">{n}i", self._take(4 * n))]
        elif sexp_type == REALSXP:
            n = self._length()
            items = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif sexp_type in (STRSXP, VECSXP):  # elements are CHARSXPs or any items, one after another
            items = [self._item() for _ in range(self._length())]
        else:
            raise ValueError(
                f"{self.source}: R type {sexp_type} at offset {self.pos - 4} is not supported by this reader"
            )
        attributes = self._attributes() if has_attr else {}
        return RVector(sexp_type, items, attributes)

    def _pairlist(self, flags: int) -> RVector:
        """A pairlist (cons cells) flattened into an RVector with a names attribute from the tags."""
        items: list[Any] = []
        tags: list[str | None] = []
        attributes: dict[str, Any] = {}
        while True:
            if flags & HAS_ATTR_BIT:
                attributes = self._attributes()
            tags.append(self._item() if flags & HAS_TAG_BIT else None)
            items.append(self._item())  # CAR
            flags = self._int()  # the CDR's flags: another cell, or the terminating NULL
            if flags & 0xFF == NILVALUE_SXP:
                break
            if flags & 0xFF != LISTSXP:
                raise ValueError(f"{self.source}: pairlist ends in R type {flags & 0xFF}; {_REINSTALL}")
        return RVector(LISTSXP, items, {**attributes, "names": RVector(STRSXP, tags)})

    def _attributes(self) -> dict[str, Any]:
        attributes = self._item()
        if not isinstance(attributes, RVector) or attributes.sexp_type != LISTSXP:
            raise ValueError(f"{self.source}: attributes are not a pairlist; {_REINSTALL}")
        return attributes.named()

    def _charsxp(self, levels: int) -> str | None:
        length = self._int()
        if length == -1:
            return None  # NA_character_
        raw = self._take(length)
        if levels & (UTF8_MASK | ASCII_MASK):
            encoding = "utf-8"
        elif levels & LATIN1_MASK:
            encoding = "latin-1"
        elif levels & BYTES_MASK:
            return raw.decode("utf-8", errors="surrogateescape")  # raw bytes: keep them round-trippable
        else:
            encoding = self.native_encoding
        try:
            return raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as error:
            raise ValueError(f"{self.source}: a string is not valid {encoding} ({error}); {_REINSTALL}") from error
