"""The public API stays usable whatever was imported first (a subpackage must never shadow a function)."""
import subprocess
import sys


def test_public_names_resolve_to_callables_after_submodule_imports():
    code = ("import velotune.training.trainer, velotune.infer.generation, velotune.exporting, velotune.lora\n"
            "import velotune as vt\n"
            "names = ['load', 'save', 'add_lora', 'merge_lora', 'unmerge_lora', 'save_adapter', 'load_adapter',\n"
            "         'train', 'generate', 'stream', 'export']\n"
            "bad = [n for n in names if not callable(getattr(vt, n))]\n"
            "print('BAD', bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "BAD []" in out.stdout


def test_import_is_light():
    code = "import sys, velotune, velotune.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
