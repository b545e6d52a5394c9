"""What one render of a chat template in the Studio may cost: the bounds template_sandbox applies.

The editor renders whatever is typed, on every edit, inside the server process; the sandbox keeps a template
away from Python internals, and these bounds keep it from hanging the server or filling its memory:
  - time: RENDER_SECONDS for all renders of one preview, checked on every line of template code and on every
    Python call made while rendering (a trace function), so no loop, however nested, runs on;
  - range(): MAX_RANGE_ITEMS numbers in all, per render;
  - values: a string or list that an operator (`+`, `*`, `%`, `**`), a method, a filter, `~`, `{{ }}` or a block
    builds may hold MAX_VALUE_CHARS characters (a list counts what it holds). Where the size is known before the
    value exists (`*`, `+`, `%` and format widths, `join`, `replace`, `center`, `indent`, `tojson`...) it is
    checked first, so the value is never built; otherwise right after;
  - all the values one render builds: MAX_RENDER_CHARS characters together; numbers: MAX_INT_BITS bits.
A bound that is reached raises LimitReached, which the sandbox reports as a "limit" error with the template line.
"""
from __future__ import annotations

import contextlib
import contextvars
import re
import string
import sys
import time
from dataclasses import dataclass

RENDER_SECONDS = 2.0
MAX_RANGE_ITEMS = 100_000
MAX_VALUE_CHARS = 256 * 1024
MAX_RENDER_CHARS = 32 * 1024 * 1024
MAX_INT_BITS = 64 * 1024
TEMPLATE_FILE = "<template>"   # the file name jinja gives code compiled from a string: how frames are told apart


class LimitReached(Exception):
    """A bound of this module was reached."""


@dataclass
class _Budget:
    deadline: float
    range_items: int = MAX_RANGE_ITEMS
    chars: int = MAX_RENDER_CHARS
    expired: bool = False


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("template_budget", default=None)


def _budget() -> _Budget:
    # Only renders run template code, and each sets a budget; a fresh one keeps any other caller bounded too.
    return _BUDGET.get() or _Budget(deadline=time.monotonic() + RENDER_SECONDS)


@contextlib.contextmanager
def bounded(deadline: float):
    """Within: the template code this thread runs is held to the bounds, and stopped past `deadline`."""
    budget = _Budget(deadline=deadline)
    token = _BUDGET.set(budget)
    previous = sys.gettrace()  # a debugger's or coverage's tracer, put back afterwards
    sys.settrace(_watch(budget))
    try:
        yield
    finally:
        sys.settrace(previous)
        _BUDGET.reset(token)


def _watch(budget: _Budget):
    """A trace function that stops the render once past the deadline: on every line of template code (loops
    included) and on every Python call. It fires once, so the error handling after it runs freely."""
    def check():
        if not budget.expired and time.monotonic() > budget.deadline:
            budget.expired = True
            raise LimitReached(f"the template ran for more than {RENDER_SECONDS:g} seconds")

    def on_line(frame, event, arg):
        check()
        return on_line

    def on_call(frame, event, arg):
        check()
        return on_line if frame.f_code.co_filename == TEMPLATE_FILE else None
    return on_call


# ---- sizes ---------------------------------------------------------------------------------------------------

def volume(value, limit: int = MAX_VALUE_CHARS + 1, indent: int = 0) -> int:
    """About how many characters `value` takes as text (a string's length; a container's items and a few
    characters per item, plus `indent` per level for indented JSON); counting stops past `limit`."""
    total, stack = 0, [(value, 0)]
    while stack and total <= limit:
        item, depth = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, (list, tuple, set, frozenset, dict)):
            items = list(item.items()) if isinstance(item, dict) else list(item)
            total += 2 + len(items) * (4 + indent * (depth + 1))
            stack.extend((child, depth + 1) for child in items)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() // 3 + 2
        else:
            total += 24
    return total


def check_size(size: int, what: str):
    if size > MAX_VALUE_CHARS:
        raise LimitReached(f"{what} would hold about {size:,} characters; a template value may hold "
                           f"{MAX_VALUE_CHARS:,}")


def spend(value):
    """Counts a value the template built (a string or container) against the render's allowance."""
    if isinstance(value, (str, list, tuple, dict)):
        size = volume(value)
        check_size(size, f"a {type(value).__name__}")
        budget = _budget()
        budget.chars -= size
        if budget.chars < 0:
            raise LimitReached(f"the template built more than {MAX_RENDER_CHARS:,} characters in all")
    return value


def check_number(value, what: str, most: int = MAX_VALUE_CHARS):
    if isinstance(value, int) and not isinstance(value, bool) and value > most:
        raise LimitReached(f"{what} {value:,} is over the limit of {most:,}")


def check_bits(bits: int):
    if bits > MAX_INT_BITS:
        raise LimitReached(f"a number of about {bits:,} bits is over the limit of {MAX_INT_BITS:,}")


_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def check_percent(fmt: str, args):
    """`fmt % args` (and the `format` filter): widths and precisions written in `fmt` or taken from `args`."""
    values = args if isinstance(args, tuple) else (args,)
    widths = sum(int(n) for field in _PERCENT_FIELD.findall(fmt) for n in field if n.isdigit())
    widths += sum(v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0)
    check_size(len(fmt) + widths + volume(args), "a %-formatted string")


def check_format_fields(fmt: str, args, kwargs):
    """str.format / format_map: the widths in the format specs, and the arguments' sizes."""
    try:
        specs = [spec or "" for _, _, spec, _ in string.Formatter().parse(fmt)]
    except ValueError:
        return  # a malformed format string: str.format itself says what is wrong
    widths = sum(int(n) for spec in specs for n in re.findall(r"\d+", spec))
    for v in (*args, *kwargs.values()):  # a nested field ({:{}}) takes its width from an argument
        check_number(v, "a format width or value")
    check_size(len(fmt) + widths + volume(args) + volume(kwargs), "a formatted string")


def check_replace(s, old, new, count=-1):
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        found = len(s) + 1 if old == "" else s.count(old)
        if isinstance(count, int) and count >= 0:
            found = min(found, count)
        check_size(len(s) + found * max(0, len(new) - len(old)), "a replaced string")


def check_join(separator, items):
    """Measures a join before it runs; returns the items as a list (an iterator is consumed here, so the
    caller must hand the join this list)."""
    items = items if isinstance(items, (list, tuple, str, dict)) else list(items)
    sep = len(separator) if isinstance(separator, str) else 0
    check_size(volume(items) + sep * max(0, len(items) - 1), "a joined string")
    return items


def str_method_args(s: str, name: str, args: tuple, kwargs: dict) -> tuple:
    """Checks a call of str method `name` before it runs; returns the arguments to call it with."""
    if name in ("center", "ljust", "rjust", "zfill") and args:
        check_number(args[0], f"str.{name} width")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        check_size(len(s) + s.count("\t") * max(0, int(size or 0)), "an expanded string")
    elif name == "replace" and len(args) >= 2:
        check_replace(s, *args[:3])
    elif name == "join" and args:
        args = (check_join(s, args[0]),) + tuple(args[1:])
    return args


def filter_args(name: str, args: tuple, kwargs: dict) -> tuple:
    """Checks a call of filter `name` (`args` start with the value filtered) before it runs; returns the
    arguments to call it with."""
    value, rest = (args[0] if args else None), args[1:]

    def arg(i, key, default=None):
        return rest[i] if len(rest) > i else kwargs.get(key, default)
    if name == "center":
        check_number(arg(0, "width", 80), "center width")
    elif name == "indent":
        width, s = arg(0, "width", 4), value if isinstance(value, str) else ""
        step = len(width) if isinstance(width, str) else max(0, width) if isinstance(width, int) else 0
        check_size(len(s) + (len(s.splitlines()) + 1) * step, "an indented string")
    elif name == "replace":
        check_replace(value, arg(0, "old"), arg(1, "new"), arg(2, "count", -1) or -1)
    elif name == "join":
        return (check_join(arg(0, "d", ""), value),) + rest
    elif name == "format" and isinstance(value, str):
        check_percent(value, tuple(rest) or tuple(kwargs.values()))
    elif name == "tojson":
        indent = arg(1, "indent")
        step = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
        check_size(volume(value, indent=max(0, step)), "JSON text")
    elif name in ("string", "list", "pprint", "sum", "xmlattr"):
        check_size(volume(value), f"the {name} filter's result")
    elif name == "urlize":  # its options are written into every link it makes
        check_size(volume(value) * (1 + volume(rest) + volume(kwargs)), "the urlize filter's result")
    elif name in ("batch", "slice"):
        check_number(arg(0, "linecount" if name == "batch" else "slices"), f"{name} count", MAX_RANGE_ITEMS)
    elif name == "wordwrap" and isinstance(value, str):
        width, wrap = arg(0, "width", 79), arg(2, "wrapstring") or "\n"
        lines = len(value) // max(1, width if isinstance(width, int) else 1) + value.count("\n") + 1
        check_size(len(value) + lines * len(str(wrap)), "a wrapped string")
    return args


def bounded_range(*args):
    """range() for templates: MAX_RANGE_ITEMS numbers in all, per render."""
    numbers = range(*args)
    try:
        size = len(numbers)
    except OverflowError:
        size = sys.maxsize
    budget = _budget()
    budget.range_items -= size
    if budget.range_items < 0:
        raise LimitReached(f"range() produced more than {MAX_RANGE_ITEMS:,} numbers in this render")
    return numbers


def bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100):
    from jinja2.utils import generate_lorem_ipsum
    check_number(n, "lipsum paragraphs", 100)
    check_number(max, "lipsum words", 1000)
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)
