"""The Studio in a real browser (Debian's chromium driven by Playwright) against a real `velotune studio` process
with a tiny model: a training run whose chart fills and survives a reload, stop and resume, streaming chat,
PDF and DOCX files in the prompt, a blind arena round with a vote, and the template editor. Each page's
screenshot is saved (VELOTUNE_SCREENSHOTS=DIR keeps them; the README shows one)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from server_process import free_port
from studio_fixtures import QUICK_RUN, make_world, studio_process

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("studio"))


@pytest.fixture(scope="module")
def screens(tmp_path_factory):
    return Path(os.environ.get("VELOTUNE_SCREENSHOTS") or tmp_path_factory.mktemp("screens"))


@pytest.fixture(scope="module")
def page(world):
    if CHROMIUM is None:   # scripts/setup.sh --test installs it (apt); without it this is a broken setup
        pytest.fail("chromium is not installed: run `apt-get install -y chromium` (scripts/setup.sh --test does)")
    from playwright.sync_api import sync_playwright
    with studio_process(world, free_port()) as (url, _):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready='1']")
            page.studio_url = url
            yield page
            browser.close()


def fill_form(page, values: dict):
    for key, value in values.items():
        field = page.locator(f"#config-form [data-key='{key}']")
        if field.evaluate("e => e.tagName") == "SELECT":
            field.select_option(str(value).lower() if isinstance(value, bool) else str(value))
        else:
            field.fill(str(value))


def chart_points(page) -> int:
    return page.evaluate("window.velotuneStudio.charts.lossChart.count")


def start_run(page, world, values: dict, name: str):
    page.click("#tabs button[data-tab='train']")
    page.fill("#train-model", world["model_ref"])
    page.fill("#train-data", world["data_ref"])
    page.fill("#train-name", name)
    fill_form(page, values)
    page.wait_for_function("!document.getElementById('start-button').disabled")
    page.click("#start-button")
    # The new run's view, not the one a previous test left open (its chart would satisfy the next wait).
    page.wait_for_function(f"document.getElementById('run-title').textContent === {json.dumps(name)}")
    page.wait_for_selector("#run-view:not(.hidden)")


def test_train_preview_form_run_chart_and_reload(page, world, screens):
    page.fill("#train-model", world["model_ref"])
    page.fill("#train-data", world["data_ref"])
    fill_form(page, {"data.chat_template": "chatml"})
    page.click("#preview-button")
    page.wait_for_selector("#preview-format")
    assert "format: messages" in page.inner_text("#preview-format")
    assert page.locator("#preview .tok.trained").count() > 0 and page.locator("#preview .tok:not(.trained)").count() > 0
    # a bad value is marked on its field, with the YAML loader's message, and Start is held back
    fill_form(page, {"train.lr": "-1"})
    page.wait_for_selector("#config-form .field.bad [data-key='train.lr']")
    assert page.locator("#start-button").is_disabled()
    fill_form(page, {"train.lr": "0.01"})
    page.wait_for_function("!document.getElementById('start-button').disabled")

    steps = 12
    start_run(page, world, {**QUICK_RUN, "train.max_steps": steps}, "browser run")
    page.wait_for_function("document.getElementById('run-stats').textContent.includes('status finished')",
                           timeout=180_000)
    assert chart_points(page) == steps
    page.screenshot(path=str(screens / "studio-train.png"))
    # a reload restores the run and its whole curve
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    page.click("#runs tbody tr:first-child button")
    page.wait_for_function(f"window.velotuneStudio.charts.lossChart.count === {steps}")
    assert "finished" in page.inner_text("#runs tbody tr:first-child .status")
    # a finished run offers its exports
    page.select_option("#export-format", "merged")
    page.click("#export-button")
    page.wait_for_selector("#export-list li[data-export='merged'].done", timeout=120_000)


def test_stop_then_resume_in_the_page(page, world):
    start_run(page, world, {**QUICK_RUN, "train.max_steps": 400, "train.save_every": 1}, "stop me")
    page.wait_for_function("window.velotuneStudio.charts.lossChart.count >= 3", timeout=120_000)
    page.click("#run-stop")
    page.wait_for_function("document.getElementById('run-stats').textContent.includes('status stopped')",
                           timeout=120_000)
    stopped_at = chart_points(page)
    page.wait_for_function("!document.getElementById('run-resume').disabled")
    page.click("#run-resume")
    page.wait_for_function(f"window.velotuneStudio.charts.lossChart.count > {stopped_at}", timeout=120_000)
    page.click("#run-stop")
    page.wait_for_function("document.getElementById('run-stats').textContent.includes('status stopped')",
                           timeout=120_000)


def test_chat_streams_with_settings_and_their_sources(page, world, screens):
    page.click("#tabs button[data-tab='chat']")
    page.fill("#chat-model", world["model_ref"])
    page.fill("#chat-adapter", "")
    page.click("#chat-load")
    page.wait_for_selector("#chat-settings [data-source='temperature']")
    assert page.inner_text("#chat-settings [data-source='temperature']") in ("family (llama)", "default")
    page.fill("#chat-settings [data-setting='max_new_tokens']", "8")
    page.dispatch_event("#chat-settings [data-setting='max_new_tokens']", "change")
    assert page.inner_text("#chat-settings [data-source='max_new_tokens']") == "you"
    page.fill("#chat-input", "Who rules Vell?")
    page.click("#chat-send")
    page.wait_for_function("document.getElementById('chat-stats').textContent.includes('tok/s')")
    assert page.locator("#chat-log .msg.assistant").count() == 1
    page.wait_for_function("document.getElementById('chat-prompt').textContent.includes('Who rules Vell?')")
    page.screenshot(path=str(screens / "studio-chat.png"))
    # the conversation is saved: after a reload it is listed and opens again
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    page.click("#tabs button[data-tab='chat']")
    page.wait_for_selector("#chat-history option[value]:not([value=''])", state="attached")
    page.select_option("#chat-history", index=1)
    page.wait_for_function("document.querySelectorAll('#chat-log .msg').length === 2")
    assert page.input_value("#chat-model") == world["model_ref"]


def test_pdf_and_docx_text_reaches_the_prompt(page, world, tmp_path):
    from docx import Document
    from fpdf import FPDF
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    pdf.cell(0, 10, "The harbour of Vell opens at dawn.")
    pdf_path = tmp_path / "harbour.pdf"
    pdf.output(str(pdf_path))
    doc = Document()
    doc.add_paragraph("Tamsin river floods every spring.")
    docx_path = tmp_path / "river.docx"
    doc.save(str(docx_path))
    page.click("#tabs button[data-tab='chat']")
    page.set_input_files("#chat-files", [str(pdf_path), str(docx_path)])
    page.wait_for_selector("#chat-file-list [data-file='river.docx']")
    assert "tokens of" in page.inner_text("#chat-file-list [data-file='harbour.pdf']")
    page.fill("#chat-input", "What do the files say?")
    page.click("#chat-send")
    page.wait_for_function("document.getElementById('chat-log').querySelectorAll('.msg.assistant').length === 2")
    page.wait_for_function("document.getElementById('chat-stats').textContent.includes('tok/s')")
    page.wait_for_function("document.getElementById('chat-prompt').textContent.includes('What do the files say?')")
    prompt = page.text_content("#chat-prompt")
    assert "The harbour of Vell opens at dawn." in prompt and "Tamsin river floods every spring." in prompt


def test_an_image_reaches_a_vision_model_in_the_chat(page, world, tmp_path, tiny_llava):
    from vision_fixtures import QUESTION, digit_pngs
    shutil.copytree(tiny_llava, world["models"] / "vlm", dirs_exist_ok=True)
    [(png, _)] = digit_pngs(tmp_path, 1)
    page.click("#tabs button[data-tab='chat']")
    page.fill("#chat-model", "models:vlm")
    page.fill("#chat-adapter", "")
    page.click("#chat-load")
    page.wait_for_selector("#chat-settings [data-source='temperature']")
    page.set_input_files("#chat-files", [str(png)])
    page.wait_for_selector(f"#chat-file-list [data-file='{png.name}']")
    assert "(image)" in page.inner_text(f"#chat-file-list [data-file='{png.name}']")
    before = page.locator("#chat-log .msg.assistant").count()
    page.fill("#chat-input", QUESTION)
    page.click("#chat-send")
    page.wait_for_function(f"document.querySelectorAll('#chat-log .msg.assistant').length === {before + 1}")
    page.wait_for_function("document.getElementById('chat-prompt').textContent.includes('<image>')")
    assert page.text_content("#chat-error").strip() == ""


def test_a_blind_arena_round_with_a_vote_updates_the_leaderboard(page, world, screens):
    page.click("#tabs button[data-tab='arena']")
    rows = page.locator(".contestant")
    rows.nth(0).locator(".c-model").fill(world["model_ref"])
    rows.nth(1).locator(".c-model").fill(world["model_ref"])
    adapter = page.evaluate("fetch('/api/runs').then(r => r.json()).then(j => j.runs.find(r => r.adapter).adapter)")
    rows.nth(1).locator(".c-adapter").fill(adapter)
    page.fill("#arena-prompt", "How many moons has Vell?")
    page.click("#arena-send")
    page.wait_for_selector("#arena-vote:not(.hidden)", timeout=120_000)
    titles = page.locator(".pane-title").all_inner_texts()
    assert titles == ["Model A", "Model B"]                     # blind: no names yet
    for stats in page.locator(".pane .stats").all_inner_texts():
        assert "first token" in stats and "tok/s" in stats and "total" in stats
    page.click("#arena-vote button[data-outcome='a']")
    page.wait_for_selector("#leaderboard tbody tr")
    assert page.locator("#leaderboard tbody tr").count() == 2
    titles = page.locator(".pane-title").all_inner_texts()
    assert all("models:tiny" in t for t in titles)               # names shown after the vote
    page.screenshot(path=str(screens / "studio-arena.png"))


def test_template_editor_previews_tokens_errors_and_saves(page, world, screens):
    page.click("#tabs button[data-tab='templates']")
    page.fill("#tpl-model", world["model_ref"])
    page.click("#tpl-load")
    page.wait_for_function("document.getElementById('tpl-text').textContent.includes('<|im_start|>')")
    assert page.locator("#tpl-tokens .tok.trained").count() > 0
    template = page.input_value("#tpl-editor")
    edited = template.replace("<|im_start|>' + message['role']", "<|im_start|>' + message['role'] | upper")
    assert edited != template
    page.fill("#tpl-editor", edited)
    page.wait_for_function("document.getElementById('tpl-text').textContent.includes('<|im_start|>USER')")
    page.fill("#tpl-editor", "line one\n{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    page.wait_for_function("document.getElementById('tpl-error').textContent.includes('line')")
    assert "syntax" in page.inner_text("#tpl-error")
    page.fill("#tpl-editor", edited)
    page.wait_for_function("document.getElementById('tpl-error').textContent === ''")
    page.screenshot(path=str(screens / "studio-templates.png"))
    page.click("#tpl-save")
    page.wait_for_function("document.getElementById('tpl-saved').textContent.includes('saved')")
    # the saved template is the one in use after a reload, and chat renders with it
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    page.click("#tabs button[data-tab='templates']")
    page.fill("#tpl-model", world["model_ref"])
    page.click("#tpl-load")
    page.wait_for_function("document.getElementById('tpl-text').textContent.includes('<|im_start|>USER')")
    prompt = page.evaluate("""fetch('/api/chat/prompt', {method: 'POST', headers: {'Content-Type': 'application/json',
        'X-Velotune-Studio': '1'}, body: JSON.stringify({model: 'models:tiny', messages: [{role: 'user',
        content: 'hi'}]})}).then(r => r.json())""")
    assert "<|im_start|>USER" in prompt["prompt"]


def test_the_chart_takes_ten_thousand_points(page):
    """(How long a frame of them takes is measured by benchmarks/studio_bench.py, not asserted here.)"""
    drawn = page.evaluate("""() => { const c = window.velotuneStudio.charts.lossChart; c.clear();
        for (let i = 0; i < 10000; i++) c.add(i, Math.exp(-i / 3000) + 0.01 * Math.sin(i));
        c.draw(); return [c.count, typeof c.drawnAt]; }""")
    assert drawn == [10000, "number"]
