"""Every error edgerunner raises on purpose.

    EdgerunnerError                  base; .hint says what to do about it
    ├── ModelError                   the GGUF file: missing, not a GGUF, truncated, unsupported
    ├── ModelFetchError              the default model could not be fetched or failed its checksum
    ├── ProfileError                 unknown profile name, malformed profile file
    ├── PlanError                    nothing fits the profile (carries the memory that would)
    │   └── NoFitError               the daemon's plan does not fit this machine (exit code 3)
    ├── QuantizeError                llama.cpp refused or failed to quantize
    ├── BundleError                  bundle exists, is tampered, has the wrong schema or runtime
    │   └── ArchiveError             an archive member is unsafe (absolute, .., link, device)
    ├── ConfigError                  a daemon config file or flag is invalid
    ├── InstallError                 laying a bundle out on a device failed
    └── ClientError                  `ask` could not reach or understand the daemon

Foreign errors (OSError, ValueError from gguf, llama.cpp failures) are translated where they
enter edgerunner, with ``raise ... from exc`` so the original traceback survives. Only the CLI
turns these into click errors, exiting with the error's `exit_code` (one of ExitCode); set
EDGERUNNER_TRACEBACK=1 to see the real traceback instead.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The process exit codes of every command; systemd's Restart=on-failure restarts the
    daemon on any non-zero one. `meaning` says what each one means."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NO_FIT = 3
    RSS_CEILING = 4
    PREFLIGHT = 5

    @property
    def meaning(self) -> str:
        """What the code says, for --help texts and logs."""
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.OK: "clean stop (SIGTERM/SIGINT; in-flight work finished or cancelled in the drain)",
    ExitCode.ERROR: "error (bad bundle, model failed to load, a transport could not start)",
    ExitCode.USAGE: "usage (bad flags or config)",
    ExitCode.NO_FIT: "the plan does not fit this machine's memory (nothing fits, or --strict)",
    ExitCode.RSS_CEILING: "RSS exceeded its ceiling (drained, then exited to be restarted clean)",
    ExitCode.PREFLIGHT: "llama.cpp cannot decode on this CPU, with or without extra buffer types",
}


class EdgerunnerError(Exception):
    """Base class: a message saying what failed, and a hint saying how to fix it."""

    exit_code: ExitCode = ExitCode.ERROR  # the CLI exits with it

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


class NoFitError(PlanError):
    """At start-up, the bundle's plan does not fit the memory this machine has."""

    exit_code = ExitCode.NO_FIT


class ConfigError(EdgerunnerError):
    """Daemon configuration is invalid."""


class InstallError(EdgerunnerError):
    """Installing a bundle onto the device failed."""


class ClientError(EdgerunnerError):
    """The client could not talk to the daemon."""
