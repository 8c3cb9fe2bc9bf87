"""One exception hierarchy for the whole package.

Only ``cli.py`` turns these into messages and exit codes; everything else raises
(chained with ``from``) and lets the edge decide.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # systemd's RestartPreventExitStatus=78 stops restart loops on bad config


class TriageError(Exception):
    """Root of every error this package raises on purpose."""

    exit_code = EXIT_FAILURE


class UsageError(TriageError):
    """The command line asks for something impossible."""

    exit_code = EXIT_USAGE


class ConfigError(TriageError):
    """The settings file or environment is invalid."""

    exit_code = EXIT_CONFIG


class InputError(TriageError):
    """A file or folder the user pointed at is missing or unusable."""


class SlurmError(TriageError):
    """A Slurm command failed, timed out, is missing, or printed garbage."""


class SlurmCommandMissing(SlurmError):
    pass


class SlurmTimeout(SlurmError):
    pass


class SlurmParseError(SlurmError):
    pass


class LedgerError(TriageError):
    """The ledger cannot be read, written or locked."""


class LedgerLocked(LedgerError):
    """Another daemon holds the ledger lock."""


class LedgerCorrupt(LedgerError):
    """The ledger file is not valid; it was moved aside."""


class LedgerTooNew(LedgerError):
    """The ledger was written by a newer version of slurm-triage."""


class NotifyError(TriageError):
    """Slack rejected a message or could not be reached."""


class SubmitError(TriageError):
    """A resubmission could not be built or sbatch refused it."""
