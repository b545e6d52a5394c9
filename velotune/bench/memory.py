"""Peak memory of a benchmark process's training phase."""
from __future__ import annotations

import resource
from pathlib import Path


class MemoryMeter:
    """CPU: RSS (the peak is reset through /proc/self/clear_refs after loading, where Linux allows it, so the
    training peak is seen apart from the loading peak). CUDA: torch's allocator peaks."""

    def __init__(self, device: str):
        import torch
        self.torch, self.cuda = torch, torch.device(device).type == "cuda"

    def start(self):
        self.rss_before = _status_kb("VmRSS")
        self.process_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        if self.cuda:
            self.torch.cuda.synchronize()
            self.allocated_before = self.torch.cuda.memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()

    def stop(self) -> dict:
        peak_now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mb = 1 / 1024
        # The kernel's peak counter is read from per-CPU approximations; the peak is never below an RSS we read.
        out = {"peak_rss_mb": round(max(peak_now, self.process_peak_before, self.rss_before) * mb, 1),
               "rss_before_train_mb": round(self.rss_before * mb, 1),
               "train_peak_rss_mb": round(_status_kb("VmHWM") * mb, 1) if self.reset else None}
        if self.cuda:
            self.torch.cuda.synchronize()
            out.update(cuda_before_train_mb=round(self.allocated_before / 2**20, 1),
                       cuda_max_allocated_mb=round(self.torch.cuda.max_memory_allocated() / 2**20, 1),
                       cuda_max_reserved_mb=round(self.torch.cuda.max_memory_reserved() / 2**20, 1))
        return out


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory_mb(result: dict):
    """The memory figure compared: CUDA: the allocator's peak reserved bytes (what the process takes from the
    GPU); CPU: the process's peak RSS."""
    memory = result.get("memory") or {}
    return memory.get("cuda_max_reserved_mb", memory.get("peak_rss_mb"))
