"""What a training form may ask of the Studio, beyond what the config schema accepts.

`velotune train` trusts its YAML: the user who runs it owns the machine. A Studio form may come from anyone who
can reach the page, so the values that would make a job read, write or run something the Studio did not pick
are held to its rules:

- every key is one field of the schema (a whole section sent as one key could replace the paths the Studio set);
- the Studio decides model.path, data.path and train.output_dir (the run directory), and checks the config
  still says so once built;
- data.eval_path and embedding.retrieval_eval are picker refs (ROOT:relative), resolved inside the roots;
- data.chat_template is a built-in name or Jinja text, never a file, and renders within the sandbox's limits;
- grpo.reward_funcs holds only the built-in rewards (a module:function would run code named by the form);
- train.report_to holds only tensorboard (written inside the run directory).
"""
from __future__ import annotations

from ..errors import ConfigError
from .paths import PathRefused, Roots

STUDIO_KEYS = ("model.path", "data.path", "train.output_dir", "train.resume", "train.overwrite")
BUILTIN_REWARDS = ("exact_match", "format", "length")
REPORT_TARGETS = ("tensorboard",)
RUN_OUTPUT = "out"     # train.output_dir, relative to the run directory the job runs in


def _items(value) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def form_policy_errors(values: dict, roots: Roots) -> tuple[dict, list[dict]]:
    """(the values with picker refs resolved to paths and the Studio's keys left out, [{"field", "message"}])."""
    from .train_forms import _canonical, _schema_fields
    known = _schema_fields()
    clean, errors = {}, []
    for key, value in values.items():
        name = _canonical(key)
        if name not in known:
            errors.append({"field": key, "message": f"'{key}' is not a field of the config (a form sends one "
                                                    "dotted key per field, e.g. train.lr)"})
            continue
        if isinstance(value, dict):
            errors.append({"field": key, "message": f"'{key}': a single value is expected, not a mapping"})
            continue
        if name in STUDIO_KEYS:
            continue   # the Studio sets these itself
        try:
            clean[key] = _checked(name, value, roots)
        except (ConfigError, PathRefused) as exc:
            errors.append({"field": key, "message": str(exc)})
    return clean, errors


def _checked(name: str, value, roots: Roots):
    if name in ("data.eval_path", "embedding.retrieval_eval") and value not in (None, ""):
        refs = value if isinstance(value, list) else [value]
        paths = [str(roots.resolve(str(ref)).path) for ref in refs]
        return paths if isinstance(value, list) else paths[0]
    if name == "data.chat_template" and isinstance(value, str) and value.strip():
        return _checked_template(value)
    if name == "grpo.reward_funcs":
        outside = [str(r) for r in _items(value) if str(r) not in BUILTIN_REWARDS]
        if outside:
            raise ConfigError(f"grpo.reward_funcs: {', '.join(map(repr, outside))}: a Studio run uses the built-in "
                              f"rewards only ({', '.join(BUILTIN_REWARDS)}); reward functions in your own module "
                              "run from the command line (velotune train)")
    if name == "train.report_to":
        outside = [str(t) for t in _items(value) if str(t) not in REPORT_TARGETS]
        if outside:
            raise ConfigError(f"train.report_to: {', '.join(map(repr, outside))}: a Studio run reports to "
                              f"{', '.join(REPORT_TARGETS)} only (inside its run directory)")
    return value


def _checked_template(value: str) -> str:
    from ..data.templates import ALIASES, BUILTIN_TEMPLATES
    key = value.strip().lower().replace("_", "-")
    if ALIASES.get(key, key) in BUILTIN_TEMPLATES:
        return value
    if "{{" not in value and "{%" not in value:
        raise ConfigError(f"data.chat_template: {value!r}: a Studio run takes a built-in template "
                          f"({', '.join(BUILTIN_TEMPLATES)}) or Jinja text, not a file")
    from .template_lab import SAMPLE_CONVERSATION, render_preview
    preview = render_preview(None, value, SAMPLE_CONVERSATION)
    if preview.error:
        line = f" line {preview.error['line']}:" if preview.error.get("line") else ""
        raise ConfigError(f"data.chat_template:{line} {preview.error['message']} ({preview.error['kind']})")
    return value


def data_inside(picked, roots: Roots):
    """A data folder is read whole: every file in it (links included) must lie inside its root."""
    import os
    if not picked.path.is_dir():
        return
    for folder, dirs, files in os.walk(picked.path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in [n for n in dirs + files if not n.startswith(".")]:
            relative = os.path.relpath(os.path.join(folder, name), roots.roots[picked.root])
            roots.resolve(f"{picked.root}:{relative}")   # PathRefused names the entry that leads out


# objectives whose data rows name audio files (relative to the manifest): each must lie inside the data's root
AUDIO_OBJECTIVES = {"asr": "speech", "speech-recognition": "speech", "tts": "tts"}


def audio_inside(picked, roots: Roots, values: dict):
    """A speech manifest's audio paths are files the job will read: each must lie inside the manifest's root."""
    from ..data.readers import read_records
    from .train_forms import _canonical
    given = {_canonical(k): v for k, v in values.items()}
    section = AUDIO_OBJECTIVES.get(str(given.get("objective") or ""))
    if section is None or picked.path.is_dir():
        return
    column = str(given.get(f"{section}.audio_column") or "audio")
    records = read_records(picked.path)
    base = picked.path.parent
    root = roots.roots[picked.root]
    for record, origin in zip(records, records.origins):
        audio = record.get(column) if isinstance(record, dict) else None
        if not isinstance(audio, str) or not audio:
            continue
        import os
        target = os.path.realpath(base / audio)
        if not (target == str(root) or target.startswith(str(root) + os.sep)):
            raise PathRefused(f"{origin}: audio {audio!r} lies outside the {picked.root} root; a Studio run reads "
                              "audio files inside it only")


def check_built_config(config, model_path: str, data_path: str):
    """The config the job will run, as the Studio set it (nothing in the form moved the paths)."""
    if str(config.model.path) != model_path or config.data.path != data_path \
            or config.train.output_dir != RUN_OUTPUT:
        raise ConfigError("the form changed where the run reads its model or data or writes its outputs; the Studio "
                          "sets those itself")
