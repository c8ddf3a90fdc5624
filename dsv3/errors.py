"""Error types shared by every package: the bottom of the layering (imports nothing from dsv3).

- `ConfigError`: a config file, `--set` override or field value that cannot be used; the
  message names the dotted key (`train.steps: ...`). Every entry point prints it as
  `<prog>: config error: ...` and exits with status 2 (`dsv3.config_base.config_error_exit`).
- `CheckpointError`: a checkpoint that cannot be read or does not fit the model; the message
  names the file or tensor.
Both are `ValueError`s (bad input), so code that catches ValueError keeps working.
- `TrackingError`: the MLflow tracking server cannot be reached when a run starts (a
  `RuntimeError`: the input is fine, the service is not); the message names the URI.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not match the model; the message names the file."""


class TrackingError(RuntimeError):
    """The tracking server cannot be reached when a run starts; the message names the URI."""
