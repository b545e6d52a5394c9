"""Model definitions (one file per architecture), the registry and the checkpoint loader."""
