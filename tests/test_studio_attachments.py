"""Studio chat attachments: reading uploaded files (and every refusal), fitting them to the context, the prompt."""
from __future__ import annotations

import io
import zipfile

import pytest

from tiny_tokenizer import make_tokenizer
from velotune.errors import VelotuneError
from velotune.studio.attachment_fit import (
    FIT_RULE, SEAM_RESERVE_TOKENS, Fitted, attachment_budget, attachments_prompt, file_block, fit_attachments,
    token_counts,
)
from velotune.studio.attachments import Attachment, AttachmentError, clean_name, read_attachment

PAGE_ONE = ["The first page opens with a plain sentence.", "It closes with a second one."]
PAGE_TWO = ["The second page holds the last sentence."]


def _pdf_bytes(pages) -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=12)
    for sentences in pages:
        pdf.add_page()
        for sentence in sentences:
            pdf.multi_cell(0, 10, sentence, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def _encrypted_pdf(user_password: str) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(_pdf_bytes([PAGE_ONE]))))
    # RC4 needs no optional crypto package, so the test runs everywhere pypdf does.
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _docx_bytes() -> bytes:
    import docx

    document = docx.Document()
    document.add_paragraph("Opening paragraph of the report.")
    table = document.add_table(rows=2, cols=2)
    for (row, col), text in {(0, 0): "name", (0, 1): "score", (1, 0): "Ada", (1, 1): "9\tout of 10"}.items():
        table.cell(row, col).text = text
    document.add_paragraph("")
    document.add_paragraph("Closing paragraph after the table.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out.getvalue()


def _refusal(name: str, data: bytes, **kwargs) -> AttachmentError:
    with pytest.raises(AttachmentError) as caught:
        read_attachment(name, data, **kwargs)
    error = caught.value
    assert isinstance(error, VelotuneError) and str(error).startswith(f'Attachment "{clean_name(name)}": ')
    return error


# --- reading ---------------------------------------------------------------------------------------------

def test_pdf_text_page_by_page_in_order():
    attachment = read_attachment("reports/q3.pdf", _pdf_bytes([PAGE_ONE, PAGE_TWO]))
    assert (attachment.name, attachment.kind) == ("q3.pdf", "pdf")
    assert attachment.details["pages"] == 2 and attachment.details["pages_without_text"] == []
    marks = ["--- page 1 of 2 ---", *PAGE_ONE, "--- page 2 of 2 ---", *PAGE_TWO]
    positions = [attachment.text.index(mark) for mark in marks]
    assert positions == sorted(positions)


def test_pdf_encrypted_with_empty_user_password_opens():
    attachment = read_attachment("open.pdf", _encrypted_pdf(""))
    assert PAGE_ONE[0] in attachment.text


def test_docx_paragraphs_and_tables_in_order():
    attachment = read_attachment("notes.docx", _docx_bytes())
    assert attachment.kind == "docx"
    assert attachment.text == ("Opening paragraph of the report.\n\nname\tscore\nAda\t9 out of 10\n\n"
                               "Closing paragraph after the table.")
    assert attachment.details["paragraphs"] == 2 and attachment.details["tables"] == 1


def test_text_kinds_decoding_and_names():
    assert read_attachment("../../etc/x/notes.txt", b"\xef\xbb\xbfline one\r\nline two\r\n").text == \
        "line one\nline two\n"
    utf16 = read_attachment("C:\\Users\\ada\\readme.md", "héllo wörld\n".encode("utf-16"))
    assert (utf16.name, utf16.kind, utf16.text) == ("readme.md", "markdown", "héllo wörld\n")
    code = read_attachment("main.PY", b"print('hi')\n")
    assert (code.kind, code.details["extension"], code.details["lines"]) == ("code", ".py", 1)
    assert clean_name('a"b<c>.txt') == "a_b_c_.txt" and clean_name("dir/") == "attachment"


def test_csv_tsv_and_json_are_validated_and_kept_as_text():
    table = read_attachment("t.csv", b'a,b\n1,"x, y"\n2,z\n')
    assert table.kind == "csv" and table.text == 'a,b\n1,"x, y"\n2,z\n'
    assert (table.details["rows"], table.details["columns"]) == (3, 2)
    assert read_attachment("t.tsv", b"a\tb\tc\n1\t2\t3\n").details["columns"] == 3
    assert read_attachment("d.json", b'{"a": [1, 2]}').text == '{"a": [1, 2]}'
    assert read_attachment("d.jsonl", b'{"a": 1}\n\n{"a": 2}\n').details["records"] == 2


def test_refusals_name_the_file_and_the_reason():
    too_big = _refusal("big.pdf", b"not even a pdf" * 100, max_bytes=1000)
    assert too_big.code == "too_large" and "over the" in too_big.reason  # refused before any parse
    unknown = _refusal("tool.exe", b"MZ")
    assert unknown.code == "unsupported" and ".exe" in unknown.reason and ".pdf" in unknown.reason \
        and ".docx" in unknown.reason and ".txt" in unknown.reason
    assert "extension" in _refusal("Makefile", b"all:\n").reason
    assert "not a usable image" in _refusal("photo.JPG", b"\xff\xd8\xff").reason
    assert ".svg" in _refusal("logo.svg", b"<svg/>").reason   # a vector image is no image the models read
    assert "binary" in _refusal("secret.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR").reason
    assert "UTF-8" in _refusal("latin.txt", b"caf\xe9\n").reason
    assert "empty" in _refusal("blank.md", b"  \n\n").reason
    assert "%PDF-" in _refusal("fake.pdf", b"hello, I am text").reason
    assert "could not be read as a PDF" in _refusal("broken.pdf", b"%PDF-1.7\ngarbage").reason


def test_structured_text_errors_give_the_line():
    assert "line 3, column 8" in _refusal("bad.json", b'{\n  "a": 1,\n  "b": ,\n}').reason
    assert "line 3" in _refusal("bad.jsonl", b'{"a": 1}\n{"a": 2}\n{"a": \n').reason
    assert "line 2" in _refusal("bad.csv", b'a,b\n"x"y,2\n').reason


def test_pdf_encrypted_or_scanned_is_refused():
    assert "encrypted" in _refusal("locked.pdf", _encrypted_pdf("secret")).reason
    assert "no extractable text" in _refusal("scan.pdf", _pdf_bytes([[]])).reason


def test_corrupt_docx_is_refused():
    assert "not a zip" in _refusal("old.docx", b"\xd0\xcf\x11\xe0 an OLE file").reason
    assert "word/document.xml" in _refusal("empty.docx", _zip({"hello.txt": b"hi"})).reason
    good = zipfile.ZipFile(io.BytesIO(_docx_bytes()))
    parts = {name: good.read(name) for name in good.namelist()}
    parts["word/document.xml"] = b"<w:document this is not xml"
    assert "could not be read as a Word document" in _refusal("broken.docx", _zip(parts)).reason


def test_docx_bomb_is_refused_before_inflating():
    from velotune.studio.attachment_formats import DOCX_MAX_DOCUMENT_XML_BYTES

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("[Content_Types].xml", b"<Types/>")
        with archive.open("word/document.xml", "w", force_zip64=True) as entry:
            chunk = b" " * (1 << 20)
            for _ in range(DOCX_MAX_DOCUMENT_XML_BYTES // len(chunk) + 1):
                entry.write(chunk)
    data = out.getvalue()
    assert len(data) < 200_000  # over a thousand to one
    error = _refusal("bomb.docx", data)
    assert error.code == "too_large" and "word/document.xml" in error.reason and "zip bomb" in error.reason


# --- fitting ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _words(count: int) -> str:
    """Text of exactly `count` tokens with the tiny tokenizer: "The" then " the" repeated."""
    return "The" + " the" * (count - 1)


def _marker(kept: int, total: int) -> str:
    return f"\n[... truncated: kept {kept} of {total} tokens]"


def _doc(name: str, tokens: int) -> Attachment:
    return Attachment(name=name, kind="text", text=_words(tokens))


def test_word_helper_is_one_token_a_word(tokenizer):
    assert [_tokens(tokenizer, _words(n)) for n in (1, 10, 200)] == [1, 10, 200]


def test_files_that_fit_are_untouched(tokenizer):
    docs = [_doc("a.txt", 10), Attachment("b.md", "markdown", "héllo\n\n")]
    fitted = fit_attachments(docs, tokenizer, budget_tokens=1000)
    assert [f.text for f in fitted] == [_words(10), "héllo"]  # trailing whitespace trimmed only
    accents = _tokens(tokenizer, "héllo")
    assert [(f.tokens, f.original_tokens, f.truncated, f.dropped, f.notice) for f in fitted] == \
        [(10, 10, False, False, None), (accents, accents, False, False, None)]
    assert [f.tokens for f in fitted] == [c["tokens"] for c in token_counts(docs, tokenizer)]


def test_fair_share_on_three_files(tokenizer):
    # Given in upload order large, small, medium: the order of the result must follow the upload.
    docs = [_doc("c.txt", 400), _doc("a.txt", 10), _doc("b.txt", 150)]
    label = _tokens(tokenizer, '<file name="a.txt">\n') + _tokens(tokenizer, "\n</file>\n\n")
    budget = 200
    fitted = fit_attachments(docs, tokenizer, budget)
    assert [f.name for f in fitted] == ["c.txt", "a.txt", "b.txt"]

    # The rule by hand: 198 after the seam reserve; a third is 66 and the small file (10 + label) fits in it;
    # the 159 it leaves is split between the other two (79 each), and each keeps the most tokens that fit
    # that share together with its marker and label.
    assert label == 29
    share = (budget - SEAM_RESERVE_TOKENS - (10 + label)) // 2
    assert share == 79

    def most_that_fit(total):
        return max(k for k in range(1, total) if label + k + _tokens(tokenizer, _marker(k, total)) <= share)

    assert (most_that_fit(400), most_that_fit(150)) == (19, 20)  # marker lengths differ with the digits
    assert [(f.tokens, f.original_tokens, f.truncated) for f in fitted] == \
        [(19, 400, True), (10, 10, False), (20, 150, True)]
    assert [f.block_tokens for f in fitted] == [label + 19 + _tokens(tokenizer, _marker(19, 400)), 10 + label,
                                                label + 20 + _tokens(tokenizer, _marker(20, 150))]

    cut = fitted[0]
    assert cut.text == _words(19) + "\n[... truncated: kept 19 of 400 tokens]"
    assert cut.notice == '"c.txt" was cut to its first 19 of 400 tokens to fit the model\'s context.'
    blocks = "".join(file_block(f.name, f.text) for f in fitted)
    assert _tokens(tokenizer, blocks) <= budget - SEAM_RESERVE_TOKENS
    assert sum(f.block_tokens for f in fitted) <= budget


def test_cut_never_splits_a_character(tokenizer):
    text = "é😀" * 300
    fitted = fit_attachments([Attachment("u.txt", "text", text)], tokenizer, 120)[0]
    head = fitted.text.split("\n[... truncated")[0]
    assert fitted.truncated and head and text.startswith(head) and "\ufffd" not in head
    assert fitted.tokens == _tokens(tokenizer, head)
    assert _tokens(tokenizer, file_block("u.txt", fitted.text)) <= 120 - SEAM_RESERVE_TOKENS


class _SeamTokenizer:
    """One token per character, except that a text ending in a blank line ends in a single token for it: a
    block tokenized alone then costs one token less than inside the joined blocks."""

    BLANK_LINE = 0x110000

    def encode(self, text, add_special_tokens=False):
        ids = [ord(c) for c in text]
        if text.endswith("\n\n"):
            ids[-2:] = [self.BLANK_LINE]
        return ids

    def decode(self, ids):
        return "".join("\n\n" if i == self.BLANK_LINE else chr(i) for i in ids)


def test_tokens_gained_where_blocks_meet_are_refitted():
    tokenizer, budget = _SeamTokenizer(), 300
    fitted = fit_attachments([Attachment(n, "text", "x" * 500) for n in ("a", "b", "c")], tokenizer, budget)
    assert all(f.truncated for f in fitted)
    joined = len(tokenizer.encode("".join(file_block(f.name, f.text) for f in fitted)))
    assert sum(f.block_tokens for f in fitted) < joined <= budget - SEAM_RESERVE_TOKENS


def test_tiny_budget_drops_files_with_notices(tokenizer):
    docs = [_doc("a.txt", 50), _doc("b.txt", 60)]
    for budget in (0, 20, -5):
        fitted = fit_attachments(docs, tokenizer, budget)
        assert [(f.name, f.dropped, f.text, f.tokens, f.original_tokens) for f in fitted] == \
            [("a.txt", True, "", 0, 50), ("b.txt", True, "", 0, 60)]
        assert all(f.notice.startswith(f'"{f.name}" (') and "left out" in f.notice for f in fitted)
        assert attachments_prompt(fitted, "Question?") == "Question?"


def test_room_for_one_cut_drops_the_last_upload(tokenizer):
    # Two shares of 49 cannot hold a label (29) and a marker (about 30) each; the whole 98 holds one cut file.
    fitted = fit_attachments([_doc("a.txt", 80), _doc("b.txt", 90)], tokenizer, 100)
    assert [(f.truncated, f.dropped) for f in fitted] == [(True, False), (False, True)]
    assert fitted[0].tokens == 98 - 29 - _tokens(tokenizer, _marker(fitted[0].tokens, 80))
    assert "b.txt" in fitted[1].notice and "left out" in fitted[1].notice


def test_empty_list_and_budget_helper():
    assert fit_attachments([], None, 100) == []
    assert attachment_budget(4096, 1000, 512) == 2584
    assert attachment_budget(4096, 4000, 512) == 0
    with pytest.raises(ValueError, match="max_new_tokens"):
        attachment_budget(4096, 10, -1)
    assert "equal share" in FIT_RULE and "truncated" in FIT_RULE


def test_attachments_prompt_exact_output():
    fitted = [Fitted("report.pdf", "--- page 1 of 1 ---\nSales rose.", 9, 9, False, None),
              Fitted("gone.txt", "", 0, 500, False, "left out", dropped=True),
              Fitted("data.csv", "a,b\n1,2\n[... truncated: kept 4 of 90 tokens]", 4, 90, True, "cut")]
    assert attachments_prompt(fitted, "What changed?") == (
        '<file name="report.pdf">\n--- page 1 of 1 ---\nSales rose.\n</file>\n\n'
        '<file name="data.csv">\na,b\n1,2\n[... truncated: kept 4 of 90 tokens]\n</file>\n\n'
        "What changed?")
    assert attachments_prompt([], "Hi") == "Hi"
