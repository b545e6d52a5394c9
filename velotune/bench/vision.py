"""Vision-language fine-tuning: velotune vs transformers' LLaVA + PEFT, side by side, each system in its own process.

    velotune bench --vision                  # CPU, fp32: a 224 px LLaVA shape, LoRA r=16 on the language model
    velotune bench --vision --quick          # the tiny LLaVA, 2 images a step, 1 + 2 steps: checks the code works
    python benchmarks/vision_bench.py ...    # the same, from a clone

Model: a LLaVA with random weights, written by transformers (velotune.bench.tiny_vlm, size "bench"): a CLIP vision
tower of 8 layers, hidden 384, 224 px in patches of 16 (196 image tokens), a two-layer projector and a Llama of 6
layers, hidden 512, with a byte-level BPE vocabulary of about 4,000 tokens (trained on the conversations and Python's
standard-library docstrings); made once and cached. Images: generated scenes (one to three coloured circles, squares
and triangles on a plain background) of several sizes and aspect ratios, so that both processors resize and crop;
each conversation asks one question about its image and the assistant answers it (from "Two." to a sentence).
Both systems train the same conversations in the same batches (in order, no shuffling), with LoRA r=16, alpha=32 on
the language model's attention and MLP linears (the tower and the projector frozen), the same lr, schedule and
clipping. The workers are vision_worker.py.
samples/s: training conversations (one image each) per second of the timed steps; label tokens/s: the tokens that
carry a loss. Memory: the process's peak RSS (CPU; loading included) or the allocator's peak reserved memory (CUDA).
Results: <out>/vision-<device>-llava.json and .md.
"""
from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError
from . import assets, report
from .machine import load_average, machine_markdown, print_and_save, short_dtype
from .processes import run_module
from .side_by_side import checks, ratios, run_systems, summarise
from .tiny_vlm import SIZES
from .train import is_cuda, side_plan
from .vision_worker import LORA_ALPHA, LORA_RANK, SYSTEMS

BENCH_CASE = dict(size="bench", image_size=224, patch_size=16)
QUICK_CASE = dict(size="tiny", image_size=32, patch_size=8)
PLANS = {
    # Three processes a system: on a shared machine one process can run ~20% slower throughout; the median drops it.
    "cpu": dict(batch=8, warmup=2, steps=6, reps=3, systems=list(SYSTEMS), precision="fp32", case=BENCH_CASE),
    "cpu-quick": dict(batch=2, warmup=1, steps=2, reps=1, systems=list(SYSTEMS), precision="fp32", case=QUICK_CASE),
    # Not run here (no GPU on the machine this was written on): bf16 autocast over fp32 weights, on both sides.
    "cuda": dict(batch=32, warmup=3, steps=20, reps=2, systems=list(SYSTEMS), precision="bf16", case=BENCH_CASE),
    "cuda-quick": dict(batch=8, warmup=1, steps=3, reps=1, systems=list(SYSTEMS), precision="bf16",
                       case=QUICK_CASE),
}
NOT_HERE = ("methods", "cases", "seq", "max_seq_search", "memory_budget_mb", "seq_limit", "seq_grain",
            "peak_tflops")
LR = 1e-3
# Issue 17's goals for this benchmark (the CPU only).
GOALS = {"cpu": dict(speed=1.5, memory=0.6)}
LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_plan(ns) -> dict:
    plan = side_plan(ns, PLANS, SYSTEMS, lr=LR, name="vision",
                     why=" (it trains one LLaVA shape with LoRA on its own conversations)", refused=NOT_HERE)
    # The weights stay fp32 on both sides: --dtype bfloat16 means bf16 autocast (mixed precision), the CUDA default.
    plan["dtype"] = "float32"
    if ns.dtype:
        plan["precision"] = short_dtype(ns.dtype)  # bf16 or fp32 autocast
    if plan["batch"] < 1:
        raise ConfigError(f"--batch {plan['batch']}: at least one conversation a step")
    # One epoch of whole batches: every step trains `batch` conversations on both sides.
    plan["samples"] = plan["batch"] * (plan["warmup"] + plan["steps"])
    return plan


# ---- data and model -----------------------------------------------------------------------------------------------

COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 200, 40),
           "purple": (130, 50, 160), "orange": (240, 130, 30), "black": (20, 20, 20), "white": (245, 245, 245)}
BACKGROUNDS = {"grey": (128, 128, 128), "pale blue": (190, 210, 235), "beige": (225, 210, 180),
               "dark green": (30, 70, 40)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
          "bottom right": (0.75, 0.75), "centre": (0.5, 0.5)}
ASPECTS = ((1.0, 1.0), (1.25, 0.9), (0.8, 1.3), (1.5, 1.5), (0.9, 0.9), (1.4, 1.0))
NUMBERS = ("No", "One", "Two", "Three")
QUESTIONS = ("Describe the image.", "How many shapes are there?", "Which shapes do you see?",
             "What colour is the background?", "Where is the largest shape?")


def scene(i: int, image_size: int):
    """Sample i: (PIL image, question, answer), from its own seeded random stream."""
    from PIL import Image, ImageDraw
    rng = random.Random(f"vision-bench-{i}")
    aspect = ASPECTS[rng.randrange(len(ASPECTS))]
    width, height = max(8, int(image_size * aspect[0])), max(8, int(image_size * aspect[1]))
    background = rng.choice(sorted(BACKGROUNDS))
    image = Image.new("RGB", (width, height), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    drawn = []
    for place in rng.sample(sorted(PLACES), rng.randint(1, 3)):
        shape, colour, scale = rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.uniform(0.08, 0.2)
        cx, cy = PLACES[place][0] * width, PLACES[place][1] * height
        r = scale * min(width, height)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        drawn.append((scale, shape, colour, place))
    question = QUESTIONS[i % len(QUESTIONS)]
    things = [f"a {colour} {shape} {'in the' if place == 'centre' else 'at the'} {place}"
              for _, shape, colour, place in drawn]
    if question.startswith("Describe"):
        answer = (", ".join(things[:-1]) + " and " if len(things) > 1 else "") + things[-1]
        answer = f"{answer[0].upper()}{answer[1:]}, on a {background} background."
    elif question.startswith("How many"):
        answer = f"{NUMBERS[len(drawn)]}."
    elif question.startswith("Which"):
        kinds = sorted({shape for _, shape, _, _ in drawn})
        answer = (f"A {kinds[0]}." if len(kinds) == 1 else
                  "A " + ", a ".join(kinds[:-1]) + f" and a {kinds[-1]}.")
    elif question.startswith("What colour"):
        answer = f"It is {background}."
    else:
        _, shape, colour, place = max(drawn)
        answer = f"The {colour} {shape} is {'in the' if place == 'centre' else 'at the'} {place}."
    return image, question, answer


def make_data(cache: Path, count: int, image_size: int) -> Path:
    """A data file of `count` conversations (one PNG each, beside it), built once and kept in the cache; built in a
    temporary folder and renamed in, so that a build cut short is never used."""
    folder = cache / f"vision-scenes-{count}-{image_size}-{assets._key(QUESTIONS, ASPECTS, sorted(COLOURS))}"

    def build(staging: Path) -> Path:
        rows = []
        for i in range(count):
            image, question, answer = scene(i, image_size)
            name = f"scene_{i:04d}.png"
            image.save(staging / name)
            rows.append({"messages": [{"role": "user", "content": [{"type": "image", "image": name},
                                                                    {"type": "text", "text": question}]},
                                      {"role": "assistant", "content": answer}]})
        (staging / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return staging
    return assets.build_once(folder, build, what="scenes data", markers=("data.jsonl",)) / "data.jsonl"


def tokenizer_texts() -> list[str]:
    """What the checkpoint's BPE is trained on: every question and answer the scenes can make (the first 500
    scenes' cover them), and Python's standard-library docstrings for a vocabulary of a realistic size."""
    from ..embeddings.docstring_corpus import docstring_pairs
    texts = [text for i in range(500) for text in scene_texts(i)]
    for pair in docstring_pairs()[0]:
        texts += [pair.summary, pair.body]
    return texts


def scene_texts(i: int) -> tuple[str, str]:
    _, question, answer = scene(i, 8)   # the text does not depend on the image size
    return question, answer


def model_dir(cache: Path, case: dict, plan: dict) -> Path:
    """The case's LLaVA directory, written once into the cache by a child process (torch and transformers stay out
    of this one)."""
    texts = tokenizer_texts()
    out = cache / (f"vision-llava-{case['size']}-{case['image_size']}-{case['patch_size']}-"
                   f"{assets._key(texts, SIZES[case['size']], case)}")

    def build(staging: Path) -> Path:
        (staging / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts), encoding="utf-8")
        made = run_module("velotune.bench.vision_worker",
                          dict(case, system="checkpoint", device="cpu", texts=str(staging / "texts.jsonl"),
                               out_dir=str(staging / "model")), timeout=plan["timeout"], threads=plan["threads"])
        if not made.get("ok"):
            raise ConfigError(f"could not write the benchmark's LLaVA checkpoint: {made.get('error')}")
        return staging / "model"
    return assets.build_once(out, build, what="LLaVA checkpoint", markers=("config.json", "processor_config.json"))


# ---- running ------------------------------------------------------------------------------------------------------

def run(ns) -> dict:
    plan = make_plan(ns)
    case, cache = plan["case"], assets.default_cache_dir()
    started, load_before = time.time(), load_average()
    model = model_dir(cache, case, plan)
    data = make_data(cache, plan["samples"], case["image_size"])
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    print(f"vision benchmark on {plan['device']} ({plan['precision']}): LLaVA {case['size']} "
          f"({case['image_size']} px / {case['patch_size']}: {config['image_seq_length']} image tokens), LoRA "
          f"r={LORA_RANK} on the language model; {plan['samples']} conversations, {plan['batch']} a step, "
          f"{plan['warmup']} + {plan['steps']} steps; {plan['reps']} process(es) per system", flush=True)
    with tempfile.TemporaryDirectory(prefix="velotune-vision-bench-") as out_root:
        spec = dict(model_dir=str(model), data=str(data), batch=plan["batch"], warmup=plan["warmup"],
                    steps=plan["steps"], lr=plan["lr"], device=plan["device"], dtype=plan["dtype"],
                    precision=plan["precision"], threads=plan["threads"])
        runs = run_systems(plan, "velotune.bench.vision_worker", spec, Path(out_root), "samples")
    systems = summarise(runs, ("setup_s", "model_samples_per_s", "samples_per_cpu_s"))
    for name, s in systems.items():   # each process's, to show how far they spread on a shared machine
        if s["ok"]:
            s["samples_per_s_each"] = [r["samples_per_s"] for r in runs[name] if r.get("ok")]
    info = report.run_info({"lora": runs}, {}, load_before, time.time() - started)
    settings = {k: plan[k] for k in ("device", "dtype", "precision", "systems", "reps", "warmup", "steps", "lr",
                                     "threads", "quick", "samples", "batch")}
    vision, text = config["vision_config"], config["text_config"]
    settings.update(model=dict(case, image_tokens=config["image_seq_length"], vision_hidden=vision["hidden_size"],
                               vision_layers=vision["num_hidden_layers"], text_hidden=text["hidden_size"],
                               text_layers=text["num_hidden_layers"], vocab=text["vocab_size"],
                               parameters_mb=round((model / "model.safetensors").stat().st_size / 2**20, 1)),
                    model_dir=str(model), data=str(data), lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA,
                    lora_targets=LM_TARGETS, scheduler="constant", max_grad_norm=1.0)
    result = dict(machine=info, settings=settings, systems=systems, ratios=ratios(systems, {"speed_without_collator": "model_samples_per_s", "speed_per_cpu_s": "samples_per_cpu_s"}), **checks(systems),
                  runs={k: [{n: v for n, v in r.items() if n != "traceback" or not r.get("ok")} for r in rs]
                        for k, rs in runs.items()})
    dtype = "bfloat16" if plan["precision"] == "bf16" else "float32"
    print_and_save(ns, "vision", dict(plan, dtype=dtype), "llava" + ("-quick" if plan["quick"] else ""), result,
                   markdown(result))
    return result


# ---- markdown -----------------------------------------------------------------------------------------------------

def _table(result: dict) -> str:
    cuda = is_cuda(result["settings"]["device"])
    mem = "max reserved MB" if cuda else "peak RSS MB"
    lines = [f"| system | samples/s | label tokens/s | samples/s without hf's collator | samples per CPU s | {mem} | "
             "RSS before training MB | training's own peak MB | trainable params | first loss | collator s/batch | "
             "setup s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in result["systems"].items():
        if not s["ok"]:
            lines.append(f"| {name} | failed: {s['error'][:120]} ||||||||||||")
            continue
        lines.append(f"| {name} | {s['samples_per_s']:.3f} | {s['target_tokens_per_s']:.1f} | "
                     f"{s['model_samples_per_s']:.3f} | {report.fmt(s.get('samples_per_cpu_s'), '.3f')} | "
                     f"{report.fmt(s['peak_memory_mb'], '.0f')} | "
                     f"{report.fmt(s.get('rss_before_train_mb'), '.0f')} | "
                     f"{report.fmt(s.get('train_extra_mb'), '.0f')} | {s['trainable_params']:,} | "
                     f"{report.fmt(s.get('first_loss'), '.6f')} | {report.fmt(s.get('collate_s_per_batch'), '.3f')} | "
                     f"{report.fmt(s.get('setup_s'), '.1f')} |")
    return "\n".join(lines)


def _ratio_lines(result: dict) -> list:
    r = result["ratios"]
    if not r:
        return ["No ratios: a system failed (see its row)."]
    checked = {True: "yes", False: "NO", None: "—"}
    lines = ["| velotune / hf | samples/s | label tokens/s | samples/s without hf's collator | samples per CPU s | "
             "peak memory | training's own peak |", "|---|---|---|---|---|---|---|",
             f"| | {report.fmt(r['speed'], '.2f', 'x')} | {report.fmt(r['tokens_per_s'], '.2f', 'x')} | "
             f"{report.fmt(r['speed_without_collator'], '.2f', 'x')} | "
             f"{report.fmt(r['speed_per_cpu_s'], '.2f', 'x')} | "
             f"{report.fmt(r['memory'], '.2f', 'x')} | "
             f"{report.fmt(r['train_extra'], '.2f', 'x')} |", ""]
    goals = GOALS.get("cuda" if is_cuda(result["settings"]["device"]) else "cpu")
    if goals:
        lines.append(f"Goals (issue 17, on the CPU): samples/s >= {goals['speed']:g}x: "
                     f"{'met' if (r['speed'] or 0) >= goals['speed'] else 'not met'}; peak memory <= "
                     f"{goals['memory']:g}x: {'met' if r['memory'] and r['memory'] <= goals['memory'] else 'not met'}"
                     ".  ")
    lines.append(f"Checks: the same label tokens at every step (same conversations, same batches, same masks): "
                 f"{checked[result['same_batches']]}; the same trainable parameters: "
                 f"{checked[result['same_trainable_params']]}; first losses apart by "
                 f"{report.fmt(result['first_loss_rel_diff'], '.1e')} (relative; the same weights, images and "
                 "tokens: only the numerics differ).")
    return lines

def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    cuda, shape = is_cuda(s["device"]), s["model"]
    versions = m["versions"]
    text = [f"# Vision-language fine-tuning: velotune vs transformers' LLaVA + PEFT ({s['device']}, "
            f"{s['precision']})", "",
            f"Command: `{m['command']}`  ",
            f"Model: a LLaVA with random weights written by transformers (velotune.bench.tiny_vlm, size "
            f"'{shape['size']}', {shape['parameters_mb']:.0f} MB in fp32): a CLIP vision tower of "
            f"{shape['vision_layers']} layers, hidden {shape['vision_hidden']}, {shape['image_size']} px in patches "
            f"of {shape['patch_size']} ({shape['image_tokens']} image tokens), a two-layer projector, a Llama of "
            f"{shape['text_layers']} layers, hidden {shape['text_hidden']}, vocabulary {shape['vocab']:,}; fp32"
            f"{', bf16 autocast' if s['precision'] == 'bf16' else ''}. LoRA r={s['lora_rank']}, alpha="
            f"{s['lora_alpha']}, dropout 0 on the language model's {', '.join(s['lora_targets'])}; the vision "
            "tower and the projector frozen.  ",
            f"Data: {s['samples']} generated scenes (coloured shapes on a plain background, several sizes and "
            f"aspect ratios: both processors resize and crop), one question each with its answer; {s['batch']} "
            "conversations a step, in order (no shuffling), the same batches on both sides; labels on the "
            "assistant's answer and its <|im_end|> only.  ",
            f"Training: AdamW, {s['scheduler']} lr {s['lr']:g}, clipping {s['max_grad_norm']:g}, no weight decay; "
            "no evaluation.  ",
            "Systems: velotune (`vt.train`, objective sft on the LLaVA directory, vision: {vision_layers: false, "
            "projector: frozen}, data: {packing: false} with data.padding_free at its default (on for sft: a batch's "
            "conversations run as rows of documents with the fewest positions within max_seq_length, each attending "
            "only to itself); its "
            "images are processed once while the data is prepared, before the first step), "
            f"hf (transformers {versions.get('transformers')} LlavaForConditionalGeneration + PEFT "
            f"{versions.get('peft')}, a plain loop over batches that the checkpoint's LlavaProcessor builds per "
            "batch in a collator, inside the timed steps, each batch padded to its longest conversation; the images "
            "decoded beforehand).  ",
            f"Each process: {s['warmup']} untimed + {s['steps']} timed optimizer steps (loading excluded); "
            f"{s['reps']} process(es) per system, alternating; medians; {s['threads']} torch thread(s).  ",
            "samples/s: conversations (one image each) per second of the timed steps; label tokens/s: the tokens "
            "that carry a loss; without hf's collator: the same with the collator's seconds taken out of hf's "
            "steps; samples per CPU s: the same per second of the process's CPU time (steadier than wall time "
            "when other work shares the machine). " + report.memory_words(cuda)
            + " setup s: from the start of the system's code to its first step (loading; velotune also "
            "processes every image then).", "",
            "## Results", "", _table(result), "", *_ratio_lines(result), ""]
    return "\n".join(text + machine_markdown(m))


def main(argv=None):
    from .options import script_main
    script_main(run, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
