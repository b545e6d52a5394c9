"""The Jinja sandbox the Studio renders chat templates in.

The environment is set up as `transformers` sets up its own chat-template environment (immutable sandbox,
trim_blocks, lstrip_blocks, loop controls, a `{% generation %}` tag, a `tojson` filter without HTML escaping,
`raise_exception`, `strftime_now`, a restricted `dict` and `namespace`), so a template renders here to the same
text, byte for byte, as `tokenizer.apply_chat_template` renders it for training, chat and serving.

Two things differ, and only for templates that fail: reading an unsafe attribute (`''.__class__`) is an error at
once, where the stock sandbox hands back an undefined value; and every render is held to the bounds of
template_limits (time, range(), value and output sizes), each operator, method, filter and join being checked.
Failures are TemplateFault: a message, the template line, and a kind: "syntax" | "runtime" | "security" | "limit".
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime

import jinja2
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from . import template_limits as limits

MAX_OUTPUT_CHARS = 256 * 1024


@dataclass
class TemplateFault(Exception):
    """Why a template cannot be rendered. kind: "syntax" | "runtime" | "security" | "limit"."""
    message: str
    line: int | None
    kind: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message

    def as_dict(self) -> dict:
        return {"message": self.message, "line": self.line, "kind": self.kind}


class TemplateRaised(TemplateError):
    """The template called raise_exception(message)."""


# ---- what templates are given, as transformers gives it -------------------------------------------------------

def raise_exception(message):
    raise TemplateRaised(message)


def strftime_now(format):
    return datetime.now().strftime(format)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Unlike jinja's own filter: no HTML escaping, and json.dumps' options (what chat templates expect).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing out the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class TemplateNamespace(Namespace):
    """namespace(...) that refuses names starting with an underscore (a way towards Python internals)."""

    def __init__(*args, **kwargs):  # the first positional is self, so that namespace(self=...) still works
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            TemplateNamespace.check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        TemplateNamespace.check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace attribute may not start with an underscore: {name!r}")


class GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant masks; the
    body renders as it is (velotune finds the trained text by rendering prefixes, not by these tags)."""
    tags = frozenset(("generation",))

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


# ---- the checks wired into the environment --------------------------------------------------------------------

def _guarded_filter(name: str, func):
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # env / context passed first

    @functools.wraps(func)  # keeps jinja_pass_arg, so jinja still passes what the filter asks for
    def guarded(*args, **kwargs):
        args = args[:skip] + limits.filter_args(name, args[skip:], kwargs)
        return limits.spend(func(*args, **kwargs))
    return guarded


def _checked_join(parts):  # a block's output (macro, set block, filter block), joined
    parts = list(parts)
    limits.check_size(sum(len(p) for p in parts), "a block's text")
    return limits.spend("".join(parts))


def _checked_str_join(seq):  # `a ~ b`: str() of each operand, so they are measured first
    seq = list(seq)
    limits.check_size(sum(limits.volume(item) for item in seq), "a ~ concatenation")
    return limits.spend("".join(map(str, seq)))


def _finalize(value):  # every {{ expression }} passes here before str(): a huge value stops before printing
    limits.check_size(limits.volume(value), "an expression's text")
    return value


class _ChatTemplate(jinja2.Template):
    @classmethod
    def from_code(cls, environment, code, globals, uptodate=None):
        template = super().from_code(environment, code, globals, uptodate)
        # `~` compiles to the module-level helpers str_join / markup_join: the module's names are replaced.
        names = template.root_render_func.__globals__
        names["str_join"] = names["markup_join"] = _checked_str_join
        return template


class ChatTemplateSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(("*", "+", "%", "**"))
    template_class = _ChatTemplate
    concat = staticmethod(_checked_join)

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols],
                         finalize=_finalize)
        self.filters["tojson"] = tojson
        self.filters = {name: _guarded_filter(name, f) for name, f in self.filters.items()}
        self.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                            namespace=TemplateNamespace, range=limits.bounded_range, lipsum=limits.bounded_lipsum)

    def unsafe_undefined(self, obj, attribute):
        # The stock sandbox returns an undefined value that fails only when used; failing at once tells the
        # author which attribute was refused, and nothing is read from it.
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(times, int) and not isinstance(seq, (int, float)):
                    limits.check_size(limits.volume(seq) * max(0, times), "a repeated value")
            if isinstance(left, int) and isinstance(right, int):
                limits.check_bits(left.bit_length() + right.bit_length())
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            limits.check_size(limits.volume(left) + limits.volume(right), "a joined value")
        elif operator == "%" and isinstance(left, str):
            limits.check_percent(left, right)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            limits.check_bits(left.bit_length() * right)
        return limits.spend(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value):
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        @functools.wraps(wrapper)
        def checked(*args, **kwargs):
            if is_map and len(args) == 1:
                limits.check_format_fields(fmt, (), args[0] if isinstance(args[0], dict) else {})
            else:
                limits.check_format_fields(fmt, args, kwargs)
            return limits.spend(wrapper(*args, **kwargs))
        return checked

    def call(self, context, obj, /, *args, **kwargs):
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, str):
            name = getattr(obj, "__name__", "")
            if name in ("translate", "maketrans"):  # a table can map each character to a long string
                raise SecurityError(f"str.{name} is not available to chat templates")
            args = limits.str_method_args(owner, name, args, kwargs)
        return limits.spend(super().call(context, obj, *args, **kwargs))


_ENVIRONMENT = ChatTemplateSandbox()


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled in the sandbox, or TemplateFault (kind "syntax", with the line)."""
    try:
        return _ENVIRONMENT.from_string(source)
    except TemplateSyntaxError as exc:
        raise TemplateFault(exc.message or str(exc), exc.lineno, "syntax") from None
    except (RecursionError, SyntaxError, MemoryError) as exc:  # nesting past what Python compiles
        raise TemplateFault(f"the template is nested too deeply to compile ({exc})", None, "syntax") from None


def render_template(source: str, context: dict, *, deadline: float) -> str:
    """`source` rendered with `context` in the sandbox, within the bounds (time: until `deadline`, a
    time.monotonic() value); TemplateFault says why not."""
    template = compile_template(source)
    out, size = [], 0
    try:
        with limits.bounded(deadline):
            for piece in template.generate(**context):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise TemplateFault(f"the rendered text is longer than {MAX_OUTPUT_CHARS:,} characters", None,
                                        "limit")
                out.append(piece)
    except TemplateFault:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a template raises is reported as its fault, with its line
        raise _fault(exc) from None
    return "".join(out)


def template_line(exc: BaseException) -> int | None:
    """The template line an exception was raised at: the innermost template frame of its traceback (jinja
    rewrites template frames to carry template line numbers)."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == limits.TEMPLATE_FILE:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _fault(exc: Exception) -> TemplateFault:
    line = template_line(exc)
    if isinstance(exc, SecurityError):
        return TemplateFault(str(exc), line, "security")
    if isinstance(exc, limits.LimitReached):
        return TemplateFault(str(exc), line, "limit")
    if isinstance(exc, RecursionError):
        return TemplateFault("the template calls itself too deeply (a macro that never stops?)", line, "limit")
    if isinstance(exc, MemoryError):
        return TemplateFault("the template ran out of memory", line, "limit")
    text = str(exc) or type(exc).__name__
    return TemplateFault(text if isinstance(exc, TemplateError) else f"{type(exc).__name__}: {text}", line,
                         "runtime")
