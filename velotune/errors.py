"""Errors a user can act on. Each message names the file, line or field at fault."""


class VelotuneError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback by the CLI."""


class ConfigError(VelotuneError, ValueError):
    """A configuration file or value is wrong; the message names the key and the file."""


class DataError(VelotuneError, ValueError):
    """A data set file or record is wrong; the message names the file and line or record."""


class CheckpointError(VelotuneError):
    """A model checkpoint is missing, corrupt, or does not match its config."""


class UnsupportedError(VelotuneError):
    """A model type, format or option velotune does not handle; the message lists what is supported."""


class TrainingError(VelotuneError):
    """Training cannot go on (e.g. a non-finite loss); the message says what was kept."""
