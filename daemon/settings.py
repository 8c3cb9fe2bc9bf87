"""Settings: a TOML file plus ``SLURM_TRIAGE_…`` environment overrides (nested with ``__``).

Precedence: init arguments > environment > TOML file > defaults. Unknown keys are
rejected so a typo never silently falls back to a default. Secrets are SecretStr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .defaults import (
    DEFAULT_CLUSTER_MIN_COUNT,
    DEFAULT_CLUSTER_WINDOW_S,
    DEFAULT_CONFIG_FIELDS,
    DEFAULT_CONFIG_PATTERN,
    DEFAULT_HUNG_CPU_FRACTION,
    DEFAULT_HUNG_MIN_ELAPSED_S,
    DEFAULT_LOG_SUFFIXES,
    DEFAULT_SUCCESS_MARKERS,
    ENV_PREFIX,
    default_config_path,
    default_state_dir,
)
from .errors import ConfigError
from .model import RETRYABLE_BY_DEFAULT, ErrorType


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SignatureSetting(_Section):
    """A user-added classifier signature."""

    type: ErrorType
    pattern: str  # a Python regular expression
    name: str = "user"
    # where the pattern may match: "final_error" = only the line that ended the program
    # (last traceback / last ERROR record), "slurm" = slurmstepd lines, "any" = any line
    where: Literal["any", "final_error", "slurm"] = "final_error"
    ignore_case: bool = True


class ClassifySettings(_Section):
    success_markers: list[str] = Field(default_factory=lambda: list(DEFAULT_SUCCESS_MARKERS))
    signatures: list[SignatureSetting] = Field(default_factory=list)
    # time_limit with TotalCPU below this fraction of elapsed*cpus is a hang
    hung_cpu_fraction: float = DEFAULT_HUNG_CPU_FRACTION
    hung_min_elapsed_s: int = DEFAULT_HUNG_MIN_ELAPSED_S


class AnalyzeSettings(_Section):
    # relative to RESULTS_DIR; {task} is the array task index
    config_pattern: str = DEFAULT_CONFIG_PATTERN
    config_fields: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_CONFIG_FIELDS))
    # regexes with named groups job and (optional) task, matched against the file stem
    log_name_patterns: list[str] = Field(default_factory=list)
    log_suffixes: list[str] = Field(default_factory=lambda: list(DEFAULT_LOG_SUFFIXES))
    # clustering in the summary: failures of one type within this window are called out
    cluster_window_s: int = DEFAULT_CLUSTER_WINDOW_S
    cluster_min_count: int = DEFAULT_CLUSTER_MIN_COUNT


class ScriptSetting(_Section):
    """Job name (glob) -> how to resubmit it, when sacct's SubmitLine is missing or unusable."""

    job_name: str  # fnmatch pattern
    script: str
    args: list[str] = Field(default_factory=list)
    sbatch_args: list[str] = Field(default_factory=list)
    work_dir: str | None = None


class SlurmSettings(_Section):
    sacct: str = "sacct"
    squeue: str = "squeue"
    sbatch: str = "sbatch"
    timeout_s: float = 30.0
    sbatch_timeout_s: float = 60.0
    user: str | None = None  # default: the current user


class WatchSettings(_Section):
    log_dirs: list[Path] = Field(default_factory=list)
    results_dirs: list[Path] = Field(default_factory=list)
    interval_s: float = 60.0
    jitter_s: float = 5.0
    misfire_grace_s: float = 30.0
    # re-ask sacct for this long before the last tick's start, so late rows are not missed
    sacct_overlap_s: int = 600
    # on a fresh ledger, look back this far
    initial_lookback_s: int = 86400
    retention_days: float = 14.0
    # a job that finished but whose sacct row is still a placeholder is re-checked; give up after
    incomplete_row_grace_s: int = 120
    max_ticks_without_sacct_alert: int = 3

    @field_validator("interval_s")
    @classmethod
    def _positive_interval(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v


class SlackSettings(_Section):
    mode: Literal["off", "webhook", "bot"] = "off"
    webhook_url: SecretStr | None = None
    bot_token: SecretStr | None = None
    channel: str | None = None
    # points the Web API client elsewhere (tests use a local stand-in)
    base_url: str = "https://slack.com/api/"
    timeout_s: float = 10.0
    min_interval_s: float = 1.0
    max_send_attempts_per_tick: int = 3
    # time spent delivering the outbox per tick, at most
    send_budget_s: float = 10.0


NotifyOn = Literal["all", "not_retried", "retry_exhausted", "billing", "recovered"]


class NotifySettings(_Section):
    # which failures go into the digest: "all", "not_retried", "retry_exhausted", "billing"
    on: list[NotifyOn] = Field(default_factory=lambda: list[NotifyOn](["all"]))
    daily_summary_at: str | None = None  # "HH:MM" local time
    max_groups_per_digest: int = 20
    sacct_failure_alert_after: int = 3


class TypePolicy(_Section):
    enabled: bool
    max_attempts: int = 3
    base_delay_s: float = 120.0
    max_delay_s: float = 3600.0
    escalate_factor: float | None = None  # oom: --mem, time_limit: --time
    escalate_ceiling: str | None = None  # e.g. "64G" or "2-00:00:00"


def _default_type_policies() -> dict[ErrorType, TypePolicy]:
    # enabled: the design's "resubmitted by default" column (model.RETRYABLE_BY_DEFAULT)
    tuning: dict[ErrorType, dict[str, Any]] = {
        ErrorType.RATE_LIMIT: {"base_delay_s": 300.0},
        ErrorType.NETWORK: {"base_delay_s": 120.0},
        ErrorType.EMPTY_RESPONSE: {"base_delay_s": 60.0},
        ErrorType.NODE_FAIL: {"base_delay_s": 60.0},
        ErrorType.PREEMPTED: {"base_delay_s": 60.0},
        ErrorType.JSON_PARSE: {"base_delay_s": 60.0, "max_attempts": 2},
        ErrorType.TIME_LIMIT: {"max_attempts": 2},
        ErrorType.OOM: {"max_attempts": 2},
    }
    return {
        typ: TypePolicy(enabled=typ in RETRYABLE_BY_DEFAULT, **kw) for typ, kw in tuning.items()
    }


class ResubmitSettings(_Section):
    enabled: bool = False
    dry_run: bool = False
    max_per_hour: int = 20
    types: dict[ErrorType, TypePolicy] = Field(default_factory=_default_type_policies)
    # many rate-limit failures in a short window stretch the backoff for everyone
    storm_window_s: int = 600
    storm_threshold: int = 10
    storm_factor: float = 4.0
    jitter_fraction: float = 0.2
    scripts: list[ScriptSetting] = Field(default_factory=list)

    @field_validator("types")
    @classmethod
    def _no_never_types(cls, v: dict[ErrorType, TypePolicy]) -> dict[ErrorType, TypePolicy]:
        from .model import NEVER_RETRYABLE

        bad = sorted(t.value for t, p in v.items() if t in NEVER_RETRYABLE and p.enabled)
        if bad:
            raise ValueError(f"these failure types can never be resubmitted: {', '.join(bad)}")
        merged = _default_type_policies()
        merged.update(v)
        return merged

    @property
    def retryable_types(self) -> frozenset[ErrorType]:
        """The failure types a verdict calls retryable under these settings.

        Never a type of ``NEVER_RETRYABLE``: the validator above refuses to enable one.
        """
        return frozenset(t for t, policy in self.types.items() if policy.enabled)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    state_dir: Path = Field(default_factory=default_state_dir)
    classify: ClassifySettings = Field(default_factory=ClassifySettings)
    analyze: AnalyzeSettings = Field(default_factory=AnalyzeSettings)
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    slack: SlackSettings = Field(default_factory=SlackSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    resubmit: ResubmitSettings = Field(default_factory=ResubmitSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    # set by load_settings; the TOML file this came from (None = defaults + env only)
    _source_path: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = _TOML_PATH_FOR_LOAD
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.json"

    @property
    def source_path(self) -> Path | None:
        return self._source_path


# pydantic-settings builds sources from class-level configuration; load_settings sets this
# for the duration of one construction.
_TOML_PATH_FOR_LOAD: Path | None = None


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Load settings. ``path`` given and missing is an error; the default path may be absent."""
    global _TOML_PATH_FOR_LOAD
    explicit = path is not None
    toml_path = Path(path).expanduser() if path is not None else default_config_path()
    if not toml_path.exists():
        if explicit:
            raise ConfigError(f"settings file not found: {toml_path}")
        toml_path_or_none: Path | None = None
    else:
        if not toml_path.is_file():
            raise ConfigError(f"settings path is not a file: {toml_path}")
        try:
            with open(toml_path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"cannot read settings file {toml_path}: {exc.strerror}") from exc
        toml_path_or_none = toml_path
    _TOML_PATH_FOR_LOAD = toml_path_or_none
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, toml_path_or_none)) from exc
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"{toml_path}: invalid TOML: {exc}") from exc
    finally:
        _TOML_PATH_FOR_LOAD = None
    settings._source_path = toml_path_or_none
    return settings


def _describe_validation_error(exc: ValidationError, path: Path | None) -> str:
    where = str(path) if path is not None else "settings"
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        problems.append(f"{loc}: {msg}")
    return f"{where}: " + "; ".join(problems)


__all__ = [
    "ENV_PREFIX",
    "AnalyzeSettings",
    "ClassifySettings",
    "LoggingSettings",
    "NotifySettings",
    "ResubmitSettings",
    "ScriptSetting",
    "Settings",
    "SignatureSetting",
    "SlackSettings",
    "SlurmSettings",
    "TypePolicy",
    "WatchSettings",
    "default_config_path",
    "default_state_dir",
    "load_settings",
]
