"""Files a user drops into a Studio chat, read into text the model can be shown.

`read_attachment(name, data)` checks an uploaded file against an allow-list of types and returns an
`Attachment` holding its text, or raises `AttachmentError` naming the file and the reason. The checks run in
this order, so a refusal never costs a parse:

1. size: more than `max_bytes` is refused before anything else looks at the bytes;
2. type: the extension picks the kind (`KIND_BY_EXTENSION`; images by `IMAGE_MIME`); anything else off the list is
   refused with the list in the message;
3. content: the bytes must be what the extension claims (a PDF starts with ``%PDF-``, a DOCX is a zip holding
   ``word/document.xml``, text decodes as UTF-8 or BOM-marked UTF-16 and holds no NUL);
4. parse: CSV/TSV must parse with the csv module, JSON/JSONL with the json module (errors give line and
   column); PDF and DOCX text is extracted by `velotune.studio.attachment_formats`; an image must decode (within
   velotune.vision's pixel cap) and is kept as a data: URI for a vision-language model (`Attachment.image`).

The file name is only a label: its directory part is dropped and it never reaches the filesystem.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field

from velotune.studio.attachment_formats import (
    AttachmentError,
    read_docx_text,
    read_pdf_text,
)

DEFAULT_MAX_BYTES = 20 * 1024 * 1024

KIND_BY_EXTENSION: dict[str, str] = {
    **dict.fromkeys((".txt", ".text", ".log", ".rst"), "text"),
    **dict.fromkeys((".md", ".markdown"), "markdown"),
    **dict.fromkeys((".csv", ".tsv"), "csv"),
    **dict.fromkeys((".json", ".jsonl"), "json"),
    **dict.fromkeys((".py", ".js", ".mjs", ".ts", ".tsx", ".jsx", ".java", ".kt", ".c", ".h",
                     ".cc", ".cpp", ".hpp", ".cs", ".go", ".rs", ".rb", ".php", ".swift", ".scala", ".r",
                     ".jl", ".lua", ".sh", ".bash", ".sql", ".html", ".htm", ".css", ".xml", ".yaml", ".yml",
                     ".toml", ".ini", ".cfg"), "code"),
    ".pdf": "pdf",
    ".docx": "docx",
}
# Raster images a vision-language model reads, by extension -> the data: URI's type.
IMAGE_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
              ".webp": "image/webp", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}
# The kinds whose bytes are text; PDF and DOCX are binary containers read by their own parsers.
TEXT_KINDS = frozenset(("text", "markdown", "csv", "json", "code"))

_MAX_NAME_CHARS = 255
# Characters that would let a name break out of the `<file name="...">` label in the prompt, or that no
# file system allows in a name anyway.
_UNSAFE_NAME_CHARS = re.compile(r'[\x00-\x1f\x7f"<>]')


@dataclass
class Attachment:
    """One file's text as the model will see it (before fitting to the context).

    `details` depends on the kind: every kind has "extension" and "bytes"; text kinds add "lines";
    csv adds "rows", "columns" and "delimiter"; jsonl adds "records"; pdf adds "pages" and
    "pages_without_text" (1-based numbers); docx adds "paragraphs" and "tables"."""

    name: str
    kind: str
    text: str
    details: dict = field(default_factory=dict)
    image: str | None = None   # kind "image": the file as a data: URI (its text is empty)


def allowed_extensions() -> list[str]:
    """The extensions read_attachment accepts, sorted (for the page's file picker and for error messages)."""
    return sorted([*KIND_BY_EXTENSION, *IMAGE_MIME])


def clean_name(name: str | None) -> str:
    """The label shown for an uploaded file: its last path part (either slash), without control characters
    or quotes/angle brackets, at most 255 characters; "attachment" when nothing is left."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = _UNSAFE_NAME_CHARS.sub("_", base).strip()
    if len(base) > _MAX_NAME_CHARS:
        # Keep the extension: it decides how the file is read.
        stem, dot, ext = base.rpartition(".")
        base = (stem[: _MAX_NAME_CHARS - len(ext) - 1] + dot + ext) if dot and len(ext) < 16 \
            else base[:_MAX_NAME_CHARS]
    return base or "attachment"


def read_attachment(name: str, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Attachment:
    """Check and read one uploaded file; raise AttachmentError (naming the file) when it cannot be used."""
    label = clean_name(name)
    if len(data) > max_bytes:
        raise AttachmentError(label, f"the file is {_human_size(len(data))}, over the {_human_size(max_bytes)} "
                                     "limit for attachments", code="too_large")
    extension = _extension(label)
    if extension in IMAGE_MIME:
        return _read_image(label, extension, data)
    kind = KIND_BY_EXTENSION.get(extension)
    if kind is None:
        shown = f"type {extension!r}" if extension else "a file without an extension"
        raise AttachmentError(label, f"{shown} is not supported; supported types: "
                                     f"{', '.join(allowed_extensions())}", code="unsupported")
    details = {"extension": extension, "bytes": len(data)}
    if kind == "pdf":
        text, extra = read_pdf_text(label, data)
    elif kind == "docx":
        text, extra = read_docx_text(label, data)
    else:
        text = decode_text(label, data)
        extra = _check_text_kind(label, kind, extension, text)
        extra["lines"] = text.count("\n") + (0 if text.endswith("\n") else 1)
    details.update(extra)
    return Attachment(name=label, kind=kind, text=text, details=details)


def _read_image(label: str, extension: str, data: bytes) -> Attachment:
    """An image that decodes (PIL, within the pixel cap; the bytes, not the name, decide the format)."""
    import base64

    from ..errors import DataError
    from ..vision.images import load_image
    try:
        image = load_image(data, source=label, allow_files=False)
    except DataError as exc:
        raise AttachmentError(label, f"is not a usable image: {exc}") from None
    uri = f"data:{IMAGE_MIME[extension]};base64," + base64.b64encode(data).decode("ascii")
    return Attachment(name=label, kind="image", text="", image=uri,
                      details={"extension": extension, "bytes": len(data), "width": image.width,
                               "height": image.height})


def decode_text(label: str, data: bytes) -> str:
    """The text of a file that must be UTF-8 (a BOM is dropped) or UTF-16 with a BOM; line ends become "\\n".

    A NUL byte in a file without a UTF-16 BOM marks it as binary: text editors never write one."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")  # reads the BOM for the byte order, then drops it
        except UnicodeDecodeError as err:
            raise AttachmentError(label, f"starts with a UTF-16 byte-order mark but is not valid UTF-16 "
                                         f"(at byte {err.start})") from None
    else:
        if b"\x00" in data:
            raise AttachmentError(label, "holds NUL bytes, so it is a binary file, not text")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            raise AttachmentError(label, f"is not valid UTF-8 text (line {line}, byte {err.start}); save it "
                                         "as UTF-8 and upload it again") from None
    if "\x00" in text:
        raise AttachmentError(label, "holds NUL characters, so it is a binary file, not text")
    if not text.strip():
        raise AttachmentError(label, "is empty: it holds no text")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _check_text_kind(label: str, kind: str, extension: str, text: str) -> dict:
    """Validate the text of a structured kind; return what the page may show about it."""
    if kind == "csv":
        return _check_csv(label, text, delimiter="\t" if extension == ".tsv" else ",")
    if kind == "json" and extension == ".jsonl":
        return _check_jsonl(label, text)
    if kind == "json":
        _parse_json(label, text, first_line=1)
    return {}


def _check_csv(label: str, text: str, delimiter: str) -> dict:
    # strict: a stray quote is an error rather than silently merged into a field, so what the model reads
    # has the rows the user sees in a spreadsheet.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows, columns = 0, 0
    try:
        for row in reader:
            if rows == 0:
                columns = len(row)
            rows += 1
    except csv.Error as err:
        raise AttachmentError(label, f"is not valid {'TSV' if delimiter == chr(9) else 'CSV'} "
                                     f"(line {reader.line_num}): {err}") from None
    return {"rows": rows, "columns": columns, "delimiter": delimiter}


def _check_jsonl(label: str, text: str) -> dict:
    records = 0
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            _parse_json(label, line, first_line=number)
            records += 1
    return {"records": records}


def _parse_json(label: str, text: str, first_line: int) -> None:
    """Parse `text`, which starts at line `first_line` of the file (JSONL parses line by line)."""
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        raise AttachmentError(label, f"is not valid JSON (line {err.lineno + first_line - 1}, column "
                                     f"{err.colno}): {err.msg}") from None
    except (ValueError, RecursionError) as err:
        # Nesting deeper than Python's recursion limit, or an integer too long to convert.
        raise AttachmentError(label, f"is not usable JSON (from line {first_line}): "
                                     f"{err or type(err).__name__}") from None


def _extension(label: str) -> str:
    stem, dot, ext = label.rpartition(".")
    return f".{ext.lower()}" if dot and stem else ""


def _human_size(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}".replace(".0 ", " ")
        size /= 1024
    raise AssertionError("unreachable")
