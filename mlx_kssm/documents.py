"""Documents out of text: grouping lines into documents, reading local text files (UTF-8,
with the bytes that are not counted and binary files refused) and tables (jsonl/json/parquet).

What counts as not text, and where the limits come from. UTF-8 text has no undecodable
bytes and, apart from tab, newline, carriage return, form feed, vertical tab and escape, no
control bytes (NUL included). Measured shares of the first 64 KB (undecodable / control):
  text in Latin-1 or cp1252 (French, German; sentences dense with accents)    10-12% / 0%
  Russian in cp1251                                                            76% / 0%
  PNG images, a PDF, zlib-compressed or random bytes                      40-43% / 10-31%
  an ELF executable, a .pyc, a tar of text files, a SQLite file            0-31% / 17-49%
  UTF-16 text without a byte-order mark                                         0% / 50%
Hence a file is refused when more than NOT_UTF8_LIMIT (25%) of its bytes are not UTF-8, or
more than CONTROL_LIMIT (5%) are control bytes: every binary format above trips one of them,
while an 8-bit Latin text is trained on (its accented letters as U+FFFD) and reported, so the
user can convert it. The head of each file is checked before any tokenising, the whole file
while it is read.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .token_folder import DataError, one_line

# A WikiText article title: " = Title = " (section titles " = = Section = = " do not match).
TITLE_LINE = re.compile(r"^ = [^=].* = \s*$")
TITLE_LOOKAHEAD = 2_000  # lines read to decide whether a text has WikiText titles
SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "validation")}
NOT_UTF8_LIMIT = 0.25  # share of undecodable bytes above which a file is refused
CONTROL_LIMIT = 0.05  # share of control bytes (NUL, ...) above which a file is refused
CONTROL_NOTE = 0.001  # ... above which they are reported (the sotu corpus has 1 in 10 MB)
SNIFF_BYTES = 1 << 16  # the head checked before tokenising
CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\v\f\r\x1b") + b"\x7f"
ESCAPED = re.compile("[\udc80-\udcff]")  # undecodable bytes under errors="surrogateescape"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def group_documents(lines: Iterable[str]) -> Iterator[str]:
    """Group text lines into documents: at WikiText titles when the text has any, else at
    blank lines (one paragraph block per document)."""
    lines = iter(lines)
    head = [line for _, line in zip(range(TITLE_LOOKAHEAD), lines, strict=False)]
    by_title = any(TITLE_LINE.match(line) for line in head)
    current: list[str] = []
    for line in itertools.chain(head, lines):
        starts_new = TITLE_LINE.match(line) if by_title else not line.strip()
        if starts_new and current:
            text = "".join(current).strip()
            if text:
                yield text
            current = []
        if by_title or line.strip():
            current.append(line)
    text = "".join(current).strip()
    if text:
        yield text


# --------------------------------------------------------------------------- text files


@dataclass
class TextCount:
    """Bytes of a file that are not UTF-8 text, counted while it is read."""

    size: int = 0
    undecodable: int = 0  # bytes that are not valid UTF-8 (trained on as U+FFFD)
    control: int = 0  # NUL and other control bytes (valid UTF-8, but not text)

    def add(self, raw: bytes) -> str:
        """Count one line's bytes and return its text (U+FFFD for undecodable bytes)."""
        self.size += len(raw)
        self.control += len(raw) - len(raw.translate(None, CONTROL_BYTES))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.undecodable += len(ESCAPED.findall(raw.decode("utf-8", "surrogateescape")))
            return raw.decode("utf-8", errors="replace")

    @property
    def not_text(self) -> int:
        return self.undecodable + self.control

    def report(self, path: Path) -> str | None:
        """One line for the user when bytes were replaced (or control bytes are more than a
        stray one: they are trained on as they are), else None."""
        many_controls = self.control > CONTROL_NOTE * self.size
        if not (self.undecodable or many_controls):
            return None
        parts = []
        if self.undecodable:
            parts.append(f"{self.undecodable:,} are not valid UTF-8 (trained on as U+FFFD)")
        if many_controls:
            parts.append(f"{self.control:,} are control bytes such as NUL")
        return (
            f"{path}: of {self.size:,} bytes, {' and '.join(parts)}; to keep the text as it "
            "was meant, convert the file to UTF-8 (e.g. iconv -f cp1252 -t utf-8)"
        )


def check_is_text(path: Path) -> None:
    """Refuse a file whose head is not UTF-8 text (binary, UTF-16, ...), before any work."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if head.startswith(UTF16_BOMS):
        raise DataError(
            f"{path} is UTF-16 text; convert it to UTF-8 (iconv -f utf-16 -t utf-8 IN > OUT)"
        )
    count = TextCount()
    count.add(head)
    _refuse_if_not_text(path, count, f"its first {count.size:,} bytes")


def text_lines(path: Path, advance: Callable[[int], None], count: TextCount) -> Iterator[str]:
    """The lines of a UTF-8 text file, counting what is not text into ``count`` and
    reporting the bytes read to ``advance`` (for the progress bar)."""
    with open(path, "rb") as f:
        for raw in f:
            advance(len(raw))
            yield count.add(raw)
    _refuse_if_not_text(path, count, f"its {count.size:,} bytes")


def _refuse_if_not_text(path: Path, count: TextCount, which: str) -> None:
    if count.undecodable > NOT_UTF8_LIMIT * count.size:
        what = f"{count.undecodable / count.size:.0%} of {which} are not UTF-8"
    elif count.control > CONTROL_LIMIT * count.size:
        what = f"{count.control / count.size:.0%} of {which} are control bytes such as NUL"
    else:
        return
    raise DataError(
        f"{path} is not text: {what} (binary data, or text in another encoding); pass UTF-8 "
        "text files (iconv -f ENCODING -t utf-8 converts text)"
    )


# --------------------------------------------------------------------------- tables


def table_rows(path: Path) -> Iterator[str]:
    """The text column of a jsonl / json / parquet file, one document per row."""
    import datasets  # heavy (~2 s): only when such a file is used

    builder = "parquet" if path.suffix.lower() == ".parquet" else "json"
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - datasets raises many types for a bad file
        raise DataError(f"cannot read {path}: {one_line(err)}") from None
    yield from table[text_column(table.column_names, str(path))]


def text_column(columns: list[str], where: str) -> str:
    if "text" in columns:
        return "text"
    if len(columns) == 1:
        return columns[0]
    names = one_line(", ".join(map(str, columns)))
    raise DataError(f"{where} has no 'text' column (columns: {names}); name the text column text")
