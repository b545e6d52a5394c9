"""An Ollama `Modelfile` for an exported GGUF: FROM, the chat format as an Ollama (Go) template, a stop
parameter for each end-of-turn / end-of-sequence token, and the sampling settings of generation_config.json.

The chat template is recognised by its turn markers (velotune's alpaca template: word for word, since alpaca-like
templates differ in their preamble) and written as the equivalent Go template. BOS is left out of the templates:
llama.cpp adds it itself when the file says `add_bos_token`. A template of another shape gets no TEMPLATE line,
and a comment saying so: Ollama then derives the format from the GGUF's own `tokenizer.chat_template` when the
model is created.
"""
from __future__ import annotations

from ..data.templates import ALPACA as ALPACA_JINJA
from ..data.templates import default_template
from .gguf_meta import sampling_settings
from .gguf_vocab import END_OF_TURN_TOKENS

# Go templates over Ollama's .Messages; each ends with the header of the assistant turn to be generated.
CHATML = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
          '{{ end }}<|im_start|>assistant\n')
LLAMA_3 = ('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
           '{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n')
# Gemma has no system role: a system message opens the first user turn, as the Hugging Face template does.
GEMMA = ('{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{ $system = .Content }}'
         '{{- else }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
         '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>\n'
         '{{ end }}{{- end }}<start_of_turn>model\n')
PHI_3 = '{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n'
MISTRAL = ('{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ .Content }}[/INST]'
           '{{- else if eq .Role "assistant" }} {{ .Content }}</s>{{- end }}{{- end }}')
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.")


def alpaca_go_template(eos: str) -> str:
    """velotune's alpaca template (data/templates.py) over Ollama's .Messages: a leading system message replaces
    the preamble, each answer ends with EOS as in training."""
    return ('{{- if and .Messages (eq (index .Messages 0).Role "system") }}{{ (index .Messages 0).Content }}\n\n'
            '{{ else }}' + ALPACA_PREAMBLE + '\n\n{{ end }}'
            '{{- range .Messages }}{{- if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
            '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}' + eos + '\n\n{{ end }}{{- end }}'
            '### Response:\n')


# marker that identifies a chat format in a Jinja template -> (format name, Go template); first match wins
FORMATS = (("<|start_header_id|>", "llama-3", LLAMA_3), ("<|im_start|>", "chatml", CHATML),
           ("<start_of_turn>", "gemma", GEMMA), ("<|assistant|>", "phi-3", PHI_3), ("[INST]", "mistral", MISTRAL))

# our sampling field -> Ollama PARAMETER name
OLLAMA_PARAMETERS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                     "repetition_penalty": "repeat_penalty"}


def chat_format(chat_template, eos: str = "") -> tuple[str, str] | None:
    """(format name, Go template) for a Jinja chat template of a known format, else None. `eos`: the text of
    the EOS token, for the formats that write it."""
    chat_template = default_template(chat_template)
    if chat_template == ALPACA_JINJA:
        return "alpaca", alpaca_go_template(eos)
    for marker, name, go_template in FORMATS:
        if chat_template and marker in chat_template:
            return name, go_template
    return None


def stop_tokens(model, tokenizer) -> list[str]:
    """Texts of EOS (the tokenizer's and generation_config.json's) and of the end-of-turn markers the chat
    template uses, each once."""
    from ..infer.defaults import eos_token_ids
    texts = [tokenizer.convert_ids_to_tokens(i) for i in eos_token_ids(model, tokenizer)
             if 0 <= i < len(tokenizer)]
    template = tokenizer.chat_template or ""
    template = template if isinstance(template, str) else " ".join(template.values())
    texts += [t for t in END_OF_TURN_TOKENS if t in template and _is_one_token(tokenizer, t)]
    return list(dict.fromkeys(t for t in texts if t))


def modelfile_text(model, tokenizer, gguf_ref: str) -> str:
    lines = [f"FROM {gguf_ref}", ""]
    found = chat_format(getattr(tokenizer, "chat_template", None), getattr(tokenizer, "eos_token", None) or "")
    if found is not None:
        lines += [f"# chat format: {found[0]}", f'TEMPLATE """{found[1]}"""', ""]
    elif getattr(tokenizer, "chat_template", None):
        lines += ["# The chat template is not one of the formats velotune translates (llama-3, chatml, gemma, "
                  "phi-3, mistral, alpaca):",
                  "# Ollama derives the format from the GGUF's tokenizer.chat_template.", ""]
    else:
        lines += ["# The tokenizer has no chat template: prompts are passed to the model as they are.", ""]
    lines += [f"PARAMETER stop {_quote(text)}" for text in stop_tokens(model, tokenizer)]
    for key, value in sampling_settings(model).items():
        lines.append(f"PARAMETER {OLLAMA_PARAMETERS[key]} {int(value) if key == 'top_k' else float(value)}")
    return "\n".join(lines).rstrip() + "\n"


def _is_one_token(tokenizer, text: str) -> bool:
    return len(tokenizer.encode(text, add_special_tokens=False)) == 1


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
