"""Where velotune/cli.py finds `velotune bench`: the parser lives in velotune/bench/cli.py, beside its code.

cli.py may import `from .bench.cli import add_bench_parser` directly; this module then has no further use.
"""
from .bench.cli import add_bench_parser

__all__ = ["add_bench_parser"]
