import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes imports triton; triton reads TRITON_INTERPRET when a kernel is defined. Set it before any import so
# the kernel tests interpret whatever order the test files run in (dispatch still picks the reference on CPU tensors).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Both cores are often busy (two test workers, or a build): one torch thread is faster and repeatable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """A tiny LLaVA checkpoint with random weights (tests/vision_fixtures.py), written once per session."""
    from vision_fixtures import make_tiny_llava_dir
    return make_tiny_llava_dir(tmp_path_factory.mktemp("tiny-llava"))
