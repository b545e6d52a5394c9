"""What every benchmark records beside its numbers: the machine, the package versions, velotune's version (and
commit, in a clone), the exact command; where results go, and how they are written. Plain Python: no torch."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "trl", "sentence-transformers", "bitsandbytes", "liger-kernel", "triton")
PACKAGE_DIR = Path(__file__).resolve().parent.parent   # velotune/


def default_out_dir() -> Path:
    """./benchmarks/results in a clone (the recorded results live there), else ./velotune-bench-results."""
    clone = Path("benchmarks") / "results"
    return clone if clone.is_dir() else Path("velotune-bench-results")


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def versions() -> dict:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def velotune_version() -> dict:
    """The version, and in a git clone the commit and how many tracked files differ from it (else None)."""
    from .. import __version__

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=str(PACKAGE_DIR.parent), capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    inside = git("rev-parse", "--show-toplevel")
    if inside is None or Path(inside).resolve() != PACKAGE_DIR.parent:  # an installed copy: not our clone
        return {"version": __version__, "commit": None, "uncommitted_changes": None}
    changed = git("status", "--porcelain", "--untracked-files=no")
    return {"version": __version__, "commit": git("rev-parse", "HEAD"),
            "uncommitted_changes": None if changed is None else len(changed.splitlines())}


def command_line() -> str:
    """`velotune bench ...`, `python -m velotune.bench.x ...` or `python <script as typed, relative to cwd> ...`."""
    argv0 = Path(sys.argv[0])
    if argv0.name in ("velotune", "__main__.py") and argv0.parent.name in ("velotune", "bin"):
        return " ".join(["velotune"] + sys.argv[1:])
    if PACKAGE_DIR in argv0.resolve().parents:
        module = ".".join(argv0.resolve().relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        return " ".join(["python", "-m", module] + sys.argv[1:])
    try:
        script = str(argv0.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        script = str(argv0)
    return " ".join(["python", script] + sys.argv[1:])


def machine_info(devices: list, load_before, seconds: float) -> dict:
    return dict(cpu=cpu_name(), cpu_count=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version(), devices=devices, versions=versions(),
                velotune=velotune_version(), load_average_before=load_before, load_average_after=load_average(),
                duration_s=round(seconds, 1), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command=command_line())


def machine_markdown(m: dict) -> list:
    version = m["velotune"]
    commit = (f"commit {version['commit']} ({version['uncommitted_changes']} file(s) with uncommitted changes)"
              if version["commit"] else "installed package (no git commit)")
    return ["## Machine", "", f"- cpu: {m['cpu']} ({m['cpu_count']} cores); platform {m['platform']}; "
            f"python {m['python']}", f"- devices: {', '.join(m['devices']) or 'cpu'}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
            f"- velotune {version['version']}, {commit}",
            f"- load average before / after: {m['load_average_before']} / {m['load_average_after']}; "
            f"duration {m['duration_s']:.0f} s; {m['date']}", ""]


def short_dtype(dtype: str) -> str:
    """float32 -> fp32, bfloat16 -> bf16 (other names as they are): how file names and reports write a dtype."""
    return {"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)


def result_name(kind: str, device: str, shape: str, dtype: str) -> str:
    """<kind>-<cpu|cuda>-<shape>, with -fp32 / -bf16 when the dtype is not the device's default."""
    cuda = str(device).startswith("cuda")
    name = f"{kind}-{'cuda' if cuda else 'cpu'}-{shape}"
    if dtype != ("bfloat16" if cuda else "float32"):
        name += "-" + short_dtype(dtype)
    return name


def write_results(out: Path, name: str, report: dict, text: str) -> Path:
    """`name`.json and `name`.md in `out`, each written whole (a temporary file, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    for path, content in ((out / f"{name}.json", json.dumps(report, indent=1) + "\n"), (out / f"{name}.md", text)):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    return out / name


def print_and_save(ns, kind: str, plan: dict, shape: str, result: dict, text: str):
    """Prints the report; with --save (the default) writes it under --out (default: default_out_dir())."""
    print("\n" + text)
    if ns.save:
        where = write_results(Path(ns.out) if ns.out else default_out_dir(),
                              result_name(kind, plan["device"], shape, plan["dtype"]), result, text)
        print(f"wrote {where}.json and .md")
