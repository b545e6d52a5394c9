"""The packed-attention benchmark runs (tiny rows, one repetition) and its three strategies agree."""
import torch

from velotune.bench import packed_attention


def test_quick_run_times_three_strategies_that_agree(tmp_path):
    packed_attention.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "packed-attention-cpu-quick.md").exists()


def test_packed_documents_fill_the_rows_with_samples_in_the_range():
    docs = packed_attention.packed_documents(torch, 2, 300, 8, 64)
    for row in docs:
        lengths = torch.unique_consecutive(row, return_counts=True)[1]
        assert lengths.sum() == 300 and (lengths[:-1] >= 8).all() and (lengths <= 64).all()
