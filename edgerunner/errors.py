"""Every error edgerunner raises on purpose.

    EdgerunnerError                  base; .hint says what to do about it
    ├── ModelError                   the GGUF file: missing, not a GGUF, truncated, unsupported
    ├── ModelFetchError              the default model could not be fetched or failed its checksum
    ├── ProfileError                 unknown profile name, malformed profile file
    ├── PlanError                    nothing fits the profile (carries the memory that would)
    ├── QuantizeError                llama.cpp refused or failed to quantize
    ├── BundleError                  bundle exists, is tampered, has the wrong schema or runtime
    │   └── ArchiveError             an archive member is unsafe (absolute, .., link, device)
    ├── ConfigError                  a daemon config file or flag is invalid
    ├── InstallError                 laying a bundle out on a device failed
    └── ClientError                  `ask` could not reach or understand the daemon

Foreign errors (OSError, ValueError from gguf, llama.cpp failures) are translated where they
enter edgerunner, with ``raise ... from exc`` so the original traceback survives. Only the CLI
turns these into click errors; set EDGERUNNER_TRACEBACK=1 to see the real traceback instead.
"""

from __future__ import annotations


class EdgerunnerError(Exception):
    """Base class: a message saying what failed, and a hint saying how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ModelError(EdgerunnerError):
    """The model file cannot be used."""


class ModelFetchError(EdgerunnerError):
    """The default model could not be fetched or verified."""


class ProfileError(EdgerunnerError):
    """A device profile is unknown or malformed."""


class PlanError(EdgerunnerError):
    """No candidate fits the device."""

    def __init__(self, message: str, hint: str | None = None, needed_mb: float | None = None):
        super().__init__(message, hint)
        self.needed_mb = needed_mb


class QuantizeError(EdgerunnerError):
    """llama.cpp failed to quantize the model."""


class BundleError(EdgerunnerError):
    """A bundle is missing, incomplete, tampered with or made for another runtime."""


class ArchiveError(BundleError):
    """A bundle archive holds a member that could escape the extraction directory."""


class ConfigError(EdgerunnerError):
    """Daemon configuration is invalid."""


class InstallError(EdgerunnerError):
    """Installing a bundle onto the device failed."""


class ClientError(EdgerunnerError):
    """The client could not talk to the daemon."""
