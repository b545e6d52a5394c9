"""Text out of the binary attachment types (PDF, DOCX), for `velotune.studio.attachments`.

Both parsers only read: pypdf runs no PDF JavaScript and fetches nothing; python-docx parses its XML with
entity expansion off. A DOCX is a zip, so the sizes its entries claim are checked against caps before any
entry is inflated (Python's zipfile refuses to inflate an entry past the size it claims, so the claim is
binding).
"""
from __future__ import annotations

import io
import zipfile

from velotune.errors import VelotuneError


class AttachmentError(VelotuneError):
    """An uploaded file the Studio will not use; the message names the file and says why.

    `code` sorts the refusal for the HTTP layer: "too_large", "unsupported" (type not allowed) or "invalid"
    (the content is not what the extension claims, or does not parse)."""

    def __init__(self, name: str, reason: str, *, code: str = "invalid"):
        super().__init__(f'Attachment "{name}": {reason}')
        self.name = name
        self.reason = reason
        self.code = code


# Bounds on what a file may unpack to; a real document stays far below them, a crafted one hits them.
MAX_EXTRACTED_CHARS = 32_000_000
DOCX_MAX_DOCUMENT_XML_BYTES = 32 * 1024 * 1024
DOCX_MAX_UNPACKED_BYTES = 128 * 1024 * 1024


def read_pdf_text(label: str, data: bytes) -> tuple[str, dict]:
    """The text of each page, page by page under a "--- page N of M ---" line, and {"pages",
    "pages_without_text"}. Encrypted PDFs open only when they need no password; a PDF with no text at all
    (a scan) is refused, as velotune does no OCR."""
    if not data.startswith(b"%PDF-"):
        raise AttachmentError(label, "is not a PDF: a PDF file starts with %PDF-")
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            _unlock_pdf(label, reader)
        count = len(reader.pages)
        blocks, empty, chars = [], [], 0
        for number, page in enumerate(reader.pages, start=1):
            text = (page.extract_text() or "").strip()
            chars += len(text)
            if chars > MAX_EXTRACTED_CHARS:
                raise AttachmentError(label, f"extracts to more than {MAX_EXTRACTED_CHARS:,} characters "
                                             f"(stopped at page {number} of {count})")
            if not text:
                empty.append(number)
            blocks.append(f"--- page {number} of {count} ---\n{text or '[no text on this page]'}")
    except AttachmentError:
        raise
    except Exception as err:  # noqa: BLE001 - pypdf raises many exception types on malformed input
        raise AttachmentError(label, f"could not be read as a PDF ({type(err).__name__}: {err})") from None
    if count == 0:
        raise AttachmentError(label, "is a PDF without pages")
    if len(empty) == count:
        raise AttachmentError(label, "has no extractable text: it is probably scanned images of pages, and "
                                     "reading those needs OCR, which the Studio does not do")
    return "\n\n".join(blocks), {"pages": count, "pages_without_text": empty}


def _unlock_pdf(label: str, reader) -> None:
    """Open a PDF encrypted with an empty user password (viewers open those without asking); refuse others."""
    from pypdf import PasswordType
    from pypdf.errors import DependencyError

    try:
        result = reader.decrypt("")
    except DependencyError:
        raise AttachmentError(label, "is encrypted with AES; reading it needs the 'cryptography' package "
                                     "(pip install cryptography), or upload a copy saved without "
                                     "encryption") from None
    if result == PasswordType.NOT_DECRYPTED:
        raise AttachmentError(label, "is encrypted (password-protected); save a copy without a password "
                                     "and upload that")


def read_docx_text(label: str, data: bytes) -> tuple[str, dict]:
    """Paragraphs of the document body in order, one per line, and each table as tab-separated rows
    between blank lines; and {"paragraphs", "tables"}. Headers, footers, footnotes and text boxes are not read."""
    _check_docx_archive(label, data)
    import docx

    try:
        document = docx.Document(io.BytesIO(data))
        blocks, paragraphs, tables = [], 0, 0
        for item in document.iter_inner_content():
            if isinstance(item, docx.table.Table):
                rows = [row for row in _table_rows(item) if row.strip()]
                if rows:
                    tables += 1
                    blocks.append("\n" + "\n".join(rows) + "\n")
            elif item.text.strip():
                paragraphs += 1
                blocks.append(item.text)
    except Exception as err:  # noqa: BLE001 - python-docx/lxml raise many exception types on bad input
        raise AttachmentError(label, f"could not be read as a Word document ({type(err).__name__}: "
                                     f"{err})") from None
    if not blocks:
        raise AttachmentError(label, "is a Word document without text")
    return "\n".join(blocks).strip("\n"), {"paragraphs": paragraphs, "tables": tables}


def _check_docx_archive(label: str, data: bytes) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError):
        raise AttachmentError(label, "is not a valid .docx file: it is not a zip archive (a password-"
                                     "protected or old-style .doc file cannot be read)") from None
    documents = [entry for entry in entries if entry.filename == "word/document.xml"]
    if not documents:
        raise AttachmentError(label, "is not a valid .docx file: the archive holds no word/document.xml")
    biggest = max(entry.file_size for entry in documents)
    if biggest > DOCX_MAX_DOCUMENT_XML_BYTES:
        raise AttachmentError(label, f"word/document.xml unpacks to {biggest:,} bytes, over the "
                                     f"{DOCX_MAX_DOCUMENT_XML_BYTES:,}-byte limit (a zip bomb?)",
                              code="too_large")
    unpacked = sum(entry.file_size for entry in entries)
    if unpacked > DOCX_MAX_UNPACKED_BYTES:
        raise AttachmentError(label, f"unpacks to {unpacked:,} bytes, over the {DOCX_MAX_UNPACKED_BYTES:,}-"
                                     "byte limit (a zip bomb?)", code="too_large")


def _table_rows(table):
    """One tab-separated line per row; a cell merged across columns shows once, and whitespace inside a
    cell (tabs, line breaks) becomes single spaces so it cannot break the row apart."""
    for row in table.rows:
        cells, previous = [], None
        for cell in row.cells:
            element = getattr(cell, "_tc", cell)
            if element is previous:
                continue
            previous = element
            cells.append(" ".join(cell.text.split()))
        yield "\t".join(cells)
