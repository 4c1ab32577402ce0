"""Opening a torch zip checkpoint without trusting it: the file, the zip directory, the members.

Everything here is checked before the bytes it guards are read or allocated:
- the source is a regular file, opened without blocking (a FIFO or a device is refused at once);
- the zip's central directory is small enough to parse (zipfile keeps one object per entry);
- member names are unique (torch.load reads the first of two equal names, zipfile the last:
  such a file means different things to different readers), carry no NUL byte, and all sit
  in the one top folder torch writes;
- members are stored or deflated, not encrypted, their data lies inside the file without
  overlapping another's, and a deflated member claims no more than deflate can expand to;
- small members (data.pkl, byteorder) are read with a cap on their size, never whole.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
from pathlib import Path

from .errors import CheckpointError
from .pickle_guard import clip

LEGACY_HINT = "re-save it with torch >= 1.6: torch.save(torch.load(old), new)"
# torch's legacy (pre-1.6) format begins with a pickled magic number, protocol 2 long.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
MAX_MEMBERS = 100_000  # a 1,000-layer model with its optimizer moments has ~45,000 storages
MAX_DIRECTORY_BYTES = 16 << 20  # the central directory zipfile parses into objects
MAX_DEFLATE_RATIO = 1032  # the most deflate can expand (258 bytes from 2 bits, per block)
# torch writes members uncompressed; deflated ones come from other tools and are decompressed
# into memory, so their total is capped (stored members are memory-mapped instead).
MAX_INFLATED_BYTES = 256 << 20
_LOCAL_HEADER_SIZE = 30
_END_RECORD = struct.Struct("<4s4H2LH")  # end of central directory record, 22 bytes
_ZIP64_LOCATOR = b"PK\x06\x07"


def open_regular(path: Path) -> io.BufferedReader:
    """``path`` opened for reading, refused unless it is a regular file; never blocks.

    O_NONBLOCK makes opening a FIFO return at once (a plain open waits for a writer forever);
    the type is then checked on the opened descriptor, so nothing can be swapped in between.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise CheckpointError(f"{path} is a folder, not a checkpoint file")
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket or device"
        raise CheckpointError(f"{path} is {kind}, not a checkpoint file: give the .pt file itself")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)  # no effect on a regular file; restored for tidiness
    return os.fdopen(fd, "rb")


def check_is_zip(file: io.BufferedReader, path: Path) -> None:
    """Tell an empty file, the legacy format and plain garbage apart, before zipfile does."""
    head = file.read(len(_LEGACY_MAGIC))
    if not head:
        raise CheckpointError(f"{path} is empty")
    if head.startswith(_LEGACY_MAGIC):
        raise CheckpointError(
            f"{path}: legacy (pre-1.6, non-zip) torch format is not supported; {LEGACY_HINT}"
        )
    if not head.startswith(b"PK"):
        raise CheckpointError(f"{path}: not a torch checkpoint (not a zip archive)")


def check_directory_size(f: io.BufferedReader, size: int, path: Path) -> None:
    """Refuse a central directory too large to parse, from the end record, before zipfile."""
    tail_len = min(size, _END_RECORD.size + 0xFFFF + 20)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _END_RECORD.size > len(tail):
        return  # no end record: zipfile refuses the file with its own message
    fields = _END_RECORD.unpack_from(tail, at)
    entries, directory_bytes = fields[4], fields[5]
    locator = at - 20
    if (entries == 0xFFFF or directory_bytes == 0xFFFFFFFF) and tail[locator:at][:4] == (
        _ZIP64_LOCATOR
    ):
        (record_offset,) = struct.unpack_from("<Q", tail, locator + 8)
        f.seek(min(record_offset, size))
        record = f.read(56)
        if len(record) == 56 and record[:4] == b"PK\x06\x06":
            entries, directory_bytes = struct.unpack_from("<QQ", record, 32)
    if entries > MAX_MEMBERS or directory_bytes > MAX_DIRECTORY_BYTES:
        raise CheckpointError(
            f"{path}: the zip directory lists {entries:,} members in {directory_bytes:,} bytes "
            f"(a checkpoint has at most {MAX_MEMBERS:,}); refusing to parse it"
        )


def check_members(infos: list[zipfile.ZipInfo], path: Path, size: int) -> dict:
    """The members by name, once each checked; see the module docstring for what is refused."""
    members: dict[str, zipfile.ZipInfo] = {}
    inflated = sum(i.file_size for i in infos if i.compress_type == zipfile.ZIP_DEFLATED)
    if inflated > MAX_INFLATED_BYTES:
        raise CheckpointError(
            f"{path}: its compressed members hold {inflated:,} bytes; this reader decompresses "
            f"at most {MAX_INFLATED_BYTES:,} (torch.save writes members uncompressed: re-save "
            "the checkpoint with torch)"
        )
    for info in infos:
        name = clip(info.orig_filename)
        if info.filename in members:
            raise CheckpointError(
                f"{path}: the zip holds two members named {name}; torch.load would read the "
                "first and other tools the last, so the file is ambiguous: refusing it"
            )
        if info.orig_filename != info.filename:
            raise CheckpointError(f"{path}: the member name {name} holds a NUL byte")
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{path}: member {name} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointError(
                f"{path}: member {name} uses compression method {info.compress_type}; torch "
                "writes members uncompressed (stored)"
            )
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise CheckpointError(f"{path}: stored member {name} has two different sizes")
        if info.file_size > info.compress_size * MAX_DEFLATE_RATIO + 1024:
            raise CheckpointError(
                f"{path}: member {name} claims {info.file_size:,} bytes from "
                f"{info.compress_size:,} compressed, more than deflate can produce"
            )
        members[info.filename] = info
    _check_layout(infos, path, size)
    return members


def _check_layout(infos: list[zipfile.ZipInfo], path: Path, size: int) -> None:
    """Each member's data lies inside the file and does not overlap the next member's."""
    spans = sorted(
        ((info.header_offset, info.header_offset + _LOCAL_HEADER_SIZE + info.compress_size, info)
         for info in infos),
        key=lambda span: span[:2],
    )  # fmt: skip
    for (_, end, info), following in zip(spans, [*spans[1:], None], strict=True):
        if end > size:
            raise CheckpointError(
                f"{path}: member {clip(info.filename)} runs past the end of the file (truncated?)"
            )
        if following is not None and following[0] < end:
            raise CheckpointError(
                f"{path}: members {clip(info.filename, 40)} and "
                f"{clip(following[2].filename, 40)} overlap in the file"
            )


def common_folder(members: dict, path: Path) -> str:
    """The one top folder (``<name>/``) every member of a torch checkpoint sits in."""
    folders = {name.split("/", 1)[0] for name in members}
    if len(folders) != 1 or any("/" not in name for name in members):
        shown = ", ".join(clip(f, 30) for f in sorted(folders)[:3])
        raise CheckpointError(
            f"{path}: a torch checkpoint keeps all its members in one folder; this zip has "
            f"top-level entries {shown}"
        )
    return folders.pop() + "/"


def read_small_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, path: Path):
    """A member's bytes, refused when it is (or claims to be) larger than ``limit``."""
    name = clip(info.filename)
    if info.file_size > limit:
        raise CheckpointError(
            f"{path}: {name} is {info.file_size:,} bytes uncompressed; refusing more than {limit:,}"
        )
    try:
        with archive.open(info) as stream:
            data = stream.read(limit + 1)  # zipfile checks the CRC when it reaches the end
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        raise CheckpointError(f"{path}: corrupt member {name} ({clip(str(err))})") from None
    if len(data) != info.file_size:
        raise CheckpointError(f"{path}: {name} is truncated")
    return data
