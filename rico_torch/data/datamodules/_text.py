"""Text columns (``S`` arrays) as numbers, vectorised: the key and metadata parsers' common part."""

from __future__ import annotations

import numpy as np


def ascii_ints(text: np.ndarray) -> np.ndarray:
    """ASCII decimal strings (an ``S`` array; checked by the caller) as int64, column by column (no
    Python int per string, as ``astype`` makes)."""
    width = text.dtype.itemsize
    out = np.zeros(len(text), np.int64)
    if not len(text) or not width:
        return out
    chars = np.ascontiguousarray(text).view(np.uint8).reshape(len(text), width)
    for j in range(width):
        digit = chars[:, j].astype(np.int64)
        out = np.where(digit != 0, out * 10 + digit - 48, out)  # NUL: the string ended
    return out


# --- JSON lists of rows: [[int, int, "name"], ...] ---------------------------------------------------

_BLOCK = 1 << 21  # bytes read at once: bounds the parse's temporaries whatever the file's size
_WHITE = np.frombuffer(b" \t\n\r", np.uint8)
_DIGIT, _MINUS, _QUOTE, _NAME = ord("d"), ord("-"), ord('"'), 0x20


def json_rows(path, ints: int, named: bool, reduce, fallback):
    """The rows of a JSON file holding a list of lists (``ints`` integers, then a string where
    ``named``), a block at a time: ``reduce(numbers (n, ints) int64, names S (n,) or None)`` makes
    each block's part of the result, and the parts are concatenated. No Python object per entry
    in the plain form (integers without exponent, names without escapes); any other form, or a file
    that is not that shape, is left to ``fallback()``, which returns the same (numbers, names) from
    ``json`` (and names what is wrong)."""
    parts = []
    try:
        for numbers, names in _blocks(path, ints, named):
            parts.append(reduce(numbers, names))
    except _NotPlain:
        numbers, names = fallback()
        parts = [reduce(numbers[i : i + _ROWS], None if names is None else names[i : i + _ROWS])
                 for i in range(0, max(len(numbers), 1), _ROWS)]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


_ROWS = 1 << 16  # entries reduced at once on the fallback path


class _NotPlain(Exception):
    pass


def _blocks(path, ints: int, named: bool):
    """(numbers, names) of each block of whole entries; raises _NotPlain where the form is not plain."""
    with open(path, "rb") as f:
        buffer = f.read(4096).lstrip()  # the opening "[" (the blocks follow)
        if not buffer.startswith(b"["):
            raise _NotPlain
        buffer, done, cut = buffer[1:], False, False
        while True:
            more = b"" if done else f.read(_BLOCK)
            done = done or not more
            buffer += more
            if done:
                tail = buffer.rstrip()
                if not tail.endswith(b"]") or (cut and not tail[:-1].strip()):  # "[...]", no trailing ","
                    raise _NotPlain
                yield _parse(tail[:-1], ints, named)
                return
            end = _last_entry_end(buffer)
            if end is None:
                continue
            piece, buffer = buffer[:end], buffer[end:].lstrip()[1:]  # past the "," after the entry
            cut = True
            yield _parse(piece, ints, named)


def _last_entry_end(buffer: bytes) -> int | None:
    """Just past the last "]" that a "," follows (whole entries before it), or None."""
    at = len(buffer)
    while True:
        at = buffer.rfind(b"]", 0, at)
        if at < 0:
            return None
        after = buffer[at + 1 : at + 65].lstrip()
        if after.startswith(b","):
            return at + 1
        if after:  # "]]" or "] x": not between entries
            continue


def _parse(piece: bytes, ints: int, named: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Entries ``[d, d, "name"], [d, d, "name"]`` (no outer brackets) as (numbers, names)."""
    if b"\\" in piece:
        raise _NotPlain
    text = np.frombuffer(piece, np.uint8)
    quotes = np.flatnonzero(text == _QUOTE)
    if len(quotes) % 2:
        raise _NotPlain
    starts, stops = quotes[0::2] + 1, quotes[1::2]
    # inside a string: [start, stop) of each; runs of False and True written by repeat (a cumsum over
    # every byte took a third of the parse)
    bounds = np.empty(2 * len(starts) + 2, np.int64)
    bounds[0], bounds[1:-1:2], bounds[2:-1:2], bounds[-1] = 0, starts, stops, len(text)
    inside = np.repeat(np.arange(len(bounds) - 1) % 2 == 1, np.diff(bounds))
    if inside[np.flatnonzero(text < _NAME)].any():  # a control character in a string: not JSON
        raise _NotPlain
    outside = text[~inside]
    solid = ~np.isin(outside, _WHITE)
    rest = outside[solid]
    number = ((rest >= ord("0")) & (rest <= ord("9"))) | (rest == _MINUS)
    # white space inside a number ("1 2" is not 12): number characters next to each other once
    # the white space is gone, but not before (the k-th number character of both is the same)
    in_rest = np.flatnonzero(number)
    in_outside = np.flatnonzero(((outside >= ord("0")) & (outside <= ord("9"))) | (outside == _MINUS))
    if ((np.diff(in_rest) == 1) & (np.diff(in_outside) > 1)).any():
        raise _NotPlain
    before = np.concatenate([[False], number[:-1]])
    after = np.concatenate([number[1:], [False]])
    if ((rest == _MINUS) & before).any():
        raise _NotPlain  # a "-" inside a number
    runs, ends = np.flatnonzero(number & ~before), np.flatnonzero(number & ~after) + 1
    negative = rest[runs] == _MINUS
    digits_at = runs + negative
    length = ends - digits_at
    zero_led = rest[np.minimum(digits_at, len(rest) - 1)] == ord("0")
    if (length < 1).any() or (length > 15).any() or (zero_led & (length > 1)).any():
        raise _NotPlain  # a lone "-", too long, or a leading zero: not a plain JSON integer
    kept = ~(number & before)  # a number's first character stands for it
    shape = rest[kept].copy()
    shape[number[kept]] = _DIGIT
    entry = b"[" + b",".join([b"d"] * ints + ([b'""'] if named else [])) + b"]"
    shape = shape.tobytes()
    n = shape.count(b"[")
    if shape != b",".join([entry] * n):
        raise _NotPlain
    values = np.zeros(len(runs), np.int64)
    for j in range(int(length.max()) if len(length) else 0):  # digit by digit, as ascii_ints
        at = digits_at + j
        values = np.where(at < ends, values * 10 + rest[np.minimum(at, len(rest) - 1)].astype(np.int64) - 48, values)
    values = np.where(negative, -values, values).reshape(n, ints)
    if not named:
        return values, None
    width = max(int((stops - starts).max()) if n else 1, 1)
    names = np.zeros((n, width), np.uint8)
    rows = max(1, (1 << 18) // width)  # the gather's index matrix: 2 MB at a time
    for i in range(0, n, rows):
        s, e = starts[i : i + rows, None], stops[i : i + rows, None]
        index = s + np.arange(width)
        names[i : i + rows] = np.where(index < e, text[np.minimum(index, len(text) - 1)], 0)
    return values, names.view(f"S{width}").ravel()
