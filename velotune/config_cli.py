"""`velotune config [CONFIG] [key=value ...]`: prints the resolved configuration (file + overrides + defaults) as
YAML, the exact settings a `velotune train` with the same arguments would use; `--keys` lists every key."""
from __future__ import annotations

from pathlib import Path


def add_config_parser(subparsers):
    """Adds the `config` subcommand to the `velotune` command's subparsers."""
    p = subparsers.add_parser("config", help="print the resolved config as YAML (file + overrides + defaults); "
                                             "--keys lists every key")
    p.add_argument("config", nargs="?", help="YAML config file (default: none, only the defaults)")
    p.add_argument("overrides", nargs="*", help="overrides such as lora.r=32 train.lr=1e-4")
    p.add_argument("--keys", action="store_true", help="list every key with its type, default, range and help")
    p.set_defaults(func=run_config)
    return p


def run_config(ns):
    import yaml

    from .config import load_config
    from .config_help import schema_help
    if ns.keys:
        print(schema_help())
        return 0
    source, overrides = ns.config, list(ns.overrides)
    if source is not None and "=" in source and not Path(source).exists():  # no file: an override of the defaults
        source, overrides = None, [source] + overrides
    config = load_config(source if source is not None else {}, overrides)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None), end="")
    return 0
