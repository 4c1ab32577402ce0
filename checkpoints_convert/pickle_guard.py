"""Bounds on an untrusted pickle, so that a small hostile file cannot cost unbounded time,
memory or stack before it is refused.

Two passes, both linear in the size of the pickle:
- ``scan_pickle`` runs before the (C) unpickler: it walks the opcodes without building any
  object and tracks, for every value the pickle would build, how deep it nests and how many
  values it holds once shared references are expanded. It refuses, before the unpickler
  allocates anything: too many opcodes (the object count), memo indices that skip ahead (the C
  unpickler sizes its memo array by the largest index), nesting deeper than ``MAX_DEPTH``,
  values that expand past ``MAX_VALUES`` (a tuple holding the one below it twice, 40 times,
  is 2**40 values: hashing it as a dict key never ends), oversized integers, and opcodes a
  checkpoint never uses.
- ``check_structure`` runs on the unpickled object: the scan follows lists and dicts only as
  they are built, and a pickle can fill a list after it was placed in another, so the real
  depth and expanded size are measured again, exactly, on the object graph (each distinct
  object visited once). Code that walks the checkpoint afterwards can then trust both bounds.

``describe`` formats any file-supplied value for an error message in bounded time and length.
"""

from __future__ import annotations

import itertools
import pickletools

MAX_OPCODES = 2_000_000  # each opcode builds at most one object: this bounds the object count
MAX_DEPTH = 100  # a checkpoint nests about 8 levels (root, optimizer, state, index, tensor, ...)
MAX_VALUES = 4_000_000  # values once shared references are expanded (a long history is ~1M)
MAX_INT_BYTES = 64  # no checkpoint value needs an integer wider than 512 bits
MESSAGE_WIDTH = 80


class PickleLimitError(ValueError):
    """The pickle is refused; the message is one line, without the file's path."""


# -- the opcode scan --------------------------------------------------------------------------

# What each opcode does to the stack, as far as depth and expanded size go.
(ATOM, GET, PUT, MEMOIZE, MARK, EMPTY_MUTABLE, EMPTY_TUPLE, FROM_MARK_FROZEN, FROM_MARK_MUTABLE,
 TUPLE_N, ADD_ONE, ADD_TWO, ADD_FROM_MARK, POP, POP_MARK, DUP, CALL, CALL3, BUILD, PERSID, NOTHING,
 STOP) = range(1, 23)  # fmt: skip
_KINDS = {
    ATOM: "INT BININT BININT1 BININT2 LONG LONG1 LONG4 STRING BINSTRING SHORT_BINSTRING "
    "BINBYTES SHORT_BINBYTES BINBYTES8 BYTEARRAY8 NONE NEWTRUE NEWFALSE UNICODE "
    "SHORT_BINUNICODE BINUNICODE BINUNICODE8 FLOAT BINFLOAT GLOBAL PERSID",
    GET: "GET BINGET LONG_BINGET",
    PUT: "PUT BINPUT LONG_BINPUT",
    MEMOIZE: "MEMOIZE",
    MARK: "MARK",
    EMPTY_MUTABLE: "EMPTY_LIST EMPTY_DICT EMPTY_SET",
    EMPTY_TUPLE: "EMPTY_TUPLE",
    FROM_MARK_FROZEN: "TUPLE FROZENSET",
    FROM_MARK_MUTABLE: "LIST DICT INST OBJ",
    TUPLE_N: "TUPLE1 TUPLE2 TUPLE3",
    ADD_ONE: "APPEND",
    ADD_TWO: "SETITEM",
    ADD_FROM_MARK: "APPENDS SETITEMS ADDITEMS",
    POP: "POP",
    POP_MARK: "POP_MARK",
    DUP: "DUP",
    CALL: "REDUCE NEWOBJ STACK_GLOBAL",  # two operands -> one result
    CALL3: "NEWOBJ_EX",
    BUILD: "BUILD",
    PERSID: "BINPERSID",
    NOTHING: "PROTO FRAME",
    STOP: "STOP",
}
_UNUSED = {  # opcodes torch.save never writes; refused with a plain reason
    "EXT1": "extension-registry codes",
    "EXT2": "extension-registry codes",
    "EXT4": "extension-registry codes",
    "NEXT_BUFFER": "out-of-band buffers",
    "READONLY_BUFFER": "out-of-band buffers",
}
_KIND_OF = [0] * 256  # 0: refused
_WIDTH_OF = [0] * 256  # >= 0: a fixed-width argument; < 0: pickletools' variable-width codes
_NAME_OF: dict[int, str] = {}
for _op in pickletools.opcodes:
    _code = ord(_op.code.encode("latin-1"))
    _NAME_OF[_code] = _op.name
    _WIDTH_OF[_code] = _op.arg.n if _op.arg is not None else 0
    _KIND_OF[_code] = next((k for k, names in _KINDS.items() if _op.name in names.split()), 0)
_TWO_LINES = {ord("c"), ord("i")}  # GLOBAL and INST: module and name, one line each
_INTEGER_LINES = {ord("I"), ord("L")}
_LONGS = {ord("\x8a"), ord("\x8b")}
_LENGTH_WIDTH = {
    pickletools.TAKEN_FROM_ARGUMENT1: 1,
    pickletools.TAKEN_FROM_ARGUMENT4: 4,
    pickletools.TAKEN_FROM_ARGUMENT4U: 4,
    pickletools.TAKEN_FROM_ARGUMENT8U: 8,
}

_TAKEN_FROM_4U = pickletools.TAKEN_FROM_ARGUMENT4U
_ATOM = (0, 1)  # (nesting depth, expanded size) of a value that holds nothing


def scan_pickle(data: bytes) -> int:
    """Check ``data`` against the limits without unpickling it; returns the opcode count.

    Written for speed (about a microsecond per opcode): one table lookup per opcode, the
    frequent cases first.
    """
    kinds, widths = _KIND_OF, _WIDTH_OF
    stack: list = []  # per value: (depth, size), a list [depth, size] while it can still grow
    push, pop = stack.append, stack.pop
    marks: list[int] = []
    memo: dict[int, object] = {}
    pos = count = code = 0
    try:
        while True:
            code = data[pos]
            start = pos + 1
            width = widths[code]
            if width >= 0:
                pos = start + width
            elif width == _TAKEN_FROM_4U:  # BINUNICODE, BINBYTES: inlined, the most common
                pos = start + 4 + int.from_bytes(data[start : start + 4], "little")
            else:
                pos = _skip_variable(data, start, code, width)
            count += 1
            if count > MAX_OPCODES:
                raise PickleLimitError(
                    f"data.pkl holds more than {MAX_OPCODES:,} pickle operations (a real "
                    "checkpoint needs that many only for a very long history: re-save it "
                    "without)"
                )
            kind = kinds[code]
            if kind == ATOM:
                push(_ATOM)
            elif kind == GET:
                index = data[start] if width == 1 else _memo_index(data, start, pos, width)
                value = memo.get(index)
                if value is None:
                    raise PickleLimitError("data.pkl reads a memo entry it never stored")
                push(value)
            elif kind == PUT or kind == MEMOIZE:
                if kind == MEMOIZE:
                    index = len(memo)
                elif width == 1:
                    index = data[start]
                else:
                    index = _memo_index(data, start, pos, width)
                if index > len(memo):
                    # A pickler numbers memo entries 0, 1, 2, ...; the C unpickler allocates an
                    # array up to the largest index, so an index far ahead costs gigabytes.
                    raise PickleLimitError(
                        f"data.pkl stores memo entry {index:,} out of order "
                        f"(only {len(memo):,} stored before)"
                    )
                memo[index] = stack[-1]
            elif kind == MARK:
                marks.append(len(stack))
                if len(marks) > MAX_DEPTH:
                    raise PickleLimitError(f"data.pkl nests deeper than {MAX_DEPTH} levels")
            elif kind == ADD_FROM_MARK:
                first = marks.pop()
                if first == 0:
                    raise IndexError
                _grow(stack[first - 1], stack[first:])
                del stack[first:]
            elif kind == EMPTY_MUTABLE:
                push([1, 1])
            elif kind == ADD_TWO:
                items = [pop(), pop()]
                _grow(stack[-1], items)
            elif kind == ADD_ONE:
                item = pop()
                _grow(stack[-1], [item])
            elif kind == FROM_MARK_FROZEN or kind == FROM_MARK_MUTABLE:
                first = marks.pop()
                built = _combine(stack[first:])
                del stack[first:]
                push(tuple(built) if kind == FROM_MARK_FROZEN else built)
            elif kind == TUPLE_N:
                n = code - 0x84  # TUPLE1 is 0x85
                if len(stack) < n:
                    raise IndexError
                built = _combine(stack[len(stack) - n :])
                del stack[len(stack) - n :]
                push(tuple(built))
            elif kind == EMPTY_TUPLE:
                push((1, 1))
            elif kind == CALL:
                args = pop()
                push(_combine([pop(), args]))
            elif kind == BUILD:
                state = pop()
                _grow(stack[-1], [state])
            elif kind == PERSID:
                stack[-1] = _ATOM
            elif kind == CALL3:
                push(_combine([pop(), pop(), pop()]))
            elif kind == POP:
                if stack and (not marks or len(stack) > marks[-1]):
                    pop()
                else:
                    del stack[marks.pop() :]
            elif kind == POP_MARK:
                del stack[marks.pop() :]
            elif kind == DUP:
                push(stack[-1])
            elif kind == STOP:
                if len(stack) != 1 or marks or pos > len(data):
                    raise PickleLimitError("data.pkl is malformed (STOP with a bad stack)")
                return count
            elif kind == 0:
                name = _NAME_OF.get(code)
                why = _UNUSED.get(name or "", "an opcode a checkpoint never uses")
                raise PickleLimitError(f"data.pkl uses {name or f'opcode {code:#04x}'} ({why})")
    except IndexError:
        if pos >= len(data):
            raise PickleLimitError("data.pkl is truncated (no STOP opcode)") from None
        raise PickleLimitError(
            f"data.pkl is malformed ({_NAME_OF.get(code)} at byte {pos} finds too few values)"
        ) from None


def _memo_index(data: bytes, start: int, stop: int, width: int) -> int:
    if width == 1:
        return data[start]
    if width == 4:
        return int.from_bytes(data[start:stop], "little")
    text = data[start : stop - 1]  # GET and PUT: a decimal line
    if not (0 < len(text) <= 12 and text.isdigit()):
        raise PickleLimitError("data.pkl holds a malformed memo index")
    return int(text)


def _skip_variable(data: bytes, start: int, code: int, width: int) -> int:
    """The end of a variable-width argument (a line, or a length and that many bytes)."""
    if width == pickletools.UP_TO_NEWLINE:
        stop = start
        for _ in range(2 if code in _TWO_LINES else 1):
            stop = data.find(b"\n", stop) + 1
            if stop == 0:
                raise PickleLimitError("data.pkl is truncated (a line without its end)")
        if code in _INTEGER_LINES and stop - start > 2 * MAX_INT_BYTES + 3:
            raise PickleLimitError(f"data.pkl holds an integer of {stop - start:,} digits")
        return stop
    size = _LENGTH_WIDTH[width]
    if start + size > len(data):
        raise PickleLimitError("data.pkl is truncated")
    signed = width == pickletools.TAKEN_FROM_ARGUMENT4
    length = int.from_bytes(data[start : start + size], "little", signed=signed)
    if length < 0:
        raise PickleLimitError("data.pkl holds a negative length")
    if code in _LONGS and length > MAX_INT_BYTES:
        raise PickleLimitError(f"data.pkl holds an integer of {length:,} bytes")
    stop = start + size + length
    if stop > len(data):
        raise PickleLimitError(
            f"data.pkl is truncated (a {_NAME_OF[code]} of {length:,} bytes runs past its end)"
        )
    return stop


def _combine(items) -> list[int]:
    """A new container holding ``items``: one level deeper, their sizes added up."""
    depth = size = 0
    for item_depth, item_size in items:  # (a loop: faster than max() and sum() generators)
        if item_depth > depth:
            depth = item_depth
        size += item_size
    if depth >= MAX_DEPTH or size >= MAX_VALUES:
        _check(depth + 1, size + 1)
    return [depth + 1, size + 1]


def _grow(container, items) -> None:
    """Items added to a container that is still being filled (a list, dict, set or object)."""
    if type(container) is not list:
        return  # adding to a tuple or atom fails in the unpickler itself
    depth, size = container
    for item_depth, item_size in items:
        if item_depth >= depth:
            depth = item_depth + 1
        size += item_size
    _check(depth, size)
    container[0], container[1] = depth, size


def _check(depth: int, size: int) -> None:
    if depth > MAX_DEPTH:
        raise PickleLimitError(f"data.pkl nests containers deeper than {MAX_DEPTH} levels")
    if size > MAX_VALUES:
        raise PickleLimitError(
            f"data.pkl expands to more than {MAX_VALUES:,} values (shared references "
            "repeated over and over)"
        )


# -- the unpickled object ---------------------------------------------------------------------

_CONTAINERS = (dict, list, tuple, set, frozenset)


def _nested(value) -> tuple[list, int]:
    """The containers among a container's items (dict keys and values), and how many items."""
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    return [item for item in items if isinstance(item, _CONTAINERS)], len(items)


def check_structure(root) -> None:
    """Exact depth and expanded size of an unpickled object; refuses cycles.

    Each distinct container is visited once (its depth and size are remembered by id), so the
    time is linear in the number of objects, however often they are shared.
    """
    if not isinstance(root, _CONTAINERS):
        return
    done: dict[int, tuple[int, int]] = {}
    nested, n_items = _nested(root)
    # Each frame: the container, its nested containers still to visit, [depth, size].
    path = [(root, iter(nested), [1, 1 + n_items - len(nested)])]
    on_path = {id(root)}
    while path:
        container, children, measure = path[-1]
        for child in children:
            known = done.get(id(child))
            if known is None:
                if id(child) in on_path:
                    raise PickleLimitError("data.pkl holds a container that contains itself")
                if len(path) >= MAX_DEPTH:
                    raise PickleLimitError(
                        f"data.pkl nests containers deeper than {MAX_DEPTH} levels"
                    )
                nested, n_items = _nested(child)
                if nested:
                    path.append((child, iter(nested), [1, 1 + n_items - len(nested)]))
                    on_path.add(id(child))
                    break
                known = done[id(child)] = (1, 1 + n_items)  # holds only plain values
            measure[0] = max(measure[0], known[0] + 1)
            measure[1] += known[1]
            _check(measure[0], measure[1])
        else:
            path.pop()
            on_path.discard(id(container))
            _check(measure[0], measure[1])
            done[id(container)] = (measure[0], measure[1])
            if path:
                parent = path[-1][2]
                parent[0] = max(parent[0], measure[0] + 1)
                parent[1] += measure[1]
                _check(parent[0], parent[1])


# -- values in messages -----------------------------------------------------------------------


def describe(value, width: int = MESSAGE_WIDTH) -> str:
    """A short, bounded rendering of a file-supplied value for an error message."""
    text = _render(value, 2)
    return text if len(text) <= width else text[: width - 3] + "..."


def clip(text: str, width: int = MESSAGE_WIDTH) -> str:
    """Free text (an exception's message, a device name) on one line, at most ``width`` long."""
    text = " ".join(str(text)[: width * 4].split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _render(value, levels: int) -> str:
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        bits = value.bit_length()
        return repr(value) if bits <= 256 else f"<an integer of {bits:,} bits>"
    if isinstance(value, (str, bytes)):
        shown = repr(value[:MESSAGE_WIDTH])
        return shown if len(value) <= MESSAGE_WIDTH else f"{shown}... ({len(value):,} long)"
    if isinstance(value, _CONTAINERS):
        if isinstance(value, dict):
            items = (
                f"{_render(k, levels - 1)}: {_render(v, levels - 1)}" for k, v in value.items()
            )
        else:
            items = (_render(v, levels - 1) for v in value)
        shown = list(itertools.islice(items, 4)) if levels > 0 else []
        more = ", ..." if len(value) > len(shown) else ""
        open_, close = {dict: "{}", list: "[]", tuple: "()"}.get(type(value), "{}")
        return f"{open_}{', '.join(shown)}{more}{close}"
    return f"<{type(value).__name__}>"
