"""Default settings values, importable without pydantic.

``settings.py`` (pydantic-settings) takes its defaults from here. ``analyze --offline``
with no settings file and no ``SLURM_TRIAGE_…`` variable has nothing to validate: it
runs on :func:`unconfigured_offline_settings`, the same values as plain frozen
dataclasses, and never imports pydantic (~0.3 s, a third of a typical run).
``tests/test_defaults.py`` checks every value here against ``Settings()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, cast

from .model import RETRYABLE_BY_DEFAULT, ErrorType

if TYPE_CHECKING:
    from .settings import Settings

ENV_PREFIX = "SLURM_TRIAGE_"

# CSV column -> config JSON key (the seed's names)
DEFAULT_CONFIG_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "reasoning_model": "reasoning_model",
        "baseline_model": "baseline_model",
        "model_order": "model_order",
        "reasoning_budget": "reasoning_token_budget",
        "competition_level": "competition_level",
    }
)
DEFAULT_SUCCESS_MARKERS: tuple[str, ...] = (
    "✅ CONSENSUS REACHED",
    "✅ Experiment results saved",
    "results saved",
)
DEFAULT_LOG_SUFFIXES: tuple[str, ...] = (".err", ".out")
# relative to RESULTS_DIR; {task} is the array task index
DEFAULT_CONFIG_PATTERN = "configs/config_{task:04d}.json"
DEFAULT_CLUSTER_WINDOW_S = 1800
DEFAULT_CLUSTER_MIN_COUNT = 3
DEFAULT_HUNG_CPU_FRACTION = 0.01
DEFAULT_HUNG_MIN_ELAPSED_S = 600


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "slurm-triage" / "settings.toml"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "slurm-triage"


@dataclass(frozen=True, slots=True)
class AnalyzeDefaults:
    config_pattern: str = DEFAULT_CONFIG_PATTERN
    config_fields: Mapping[str, str] = field(default_factory=lambda: DEFAULT_CONFIG_FIELDS)
    log_name_patterns: tuple[str, ...] = ()
    log_suffixes: tuple[str, ...] = DEFAULT_LOG_SUFFIXES
    cluster_window_s: int = DEFAULT_CLUSTER_WINDOW_S
    cluster_min_count: int = DEFAULT_CLUSTER_MIN_COUNT


@dataclass(frozen=True, slots=True)
class ClassifyDefaults:
    success_markers: tuple[str, ...] = DEFAULT_SUCCESS_MARKERS
    signatures: tuple[()] = ()
    hung_cpu_fraction: float = DEFAULT_HUNG_CPU_FRACTION
    hung_min_elapsed_s: int = DEFAULT_HUNG_MIN_ELAPSED_S


@dataclass(frozen=True, slots=True)
class ResubmitDefaults:
    retryable_types: frozenset[ErrorType] = RETRYABLE_BY_DEFAULT
    scripts: tuple[()] = ()


@dataclass(frozen=True, slots=True)
class OfflineDefaults:
    """The sections ``analyze --offline`` reads, at their defaults."""

    analyze: AnalyzeDefaults = field(default_factory=AnalyzeDefaults)
    classify: ClassifyDefaults = field(default_factory=ClassifyDefaults)
    resubmit: ResubmitDefaults = field(default_factory=ResubmitDefaults)


def is_unconfigured(config: Path | None, environ: Mapping[str, str] | None = None) -> bool:
    """True when loading settings could only produce the defaults: no ``--config``, no
    settings file at the default path, no ``SLURM_TRIAGE_…`` variable (pydantic-settings
    matches the prefix case-insensitively, so this does too)."""
    if config is not None:
        return False
    env = os.environ if environ is None else environ
    prefix = ENV_PREFIX.lower()
    if any(name.lower().startswith(prefix) for name in env):
        return False
    return not os.path.lexists(default_config_path())


def unconfigured_offline_settings() -> Settings:
    """The defaults for ``analyze --offline`` without pydantic. Only the sections analyze
    reads exist (analyze, classify, resubmit.retryable_types/scripts); the values are the
    pydantic models' defaults, so the cast is sound for that command."""
    return cast("Settings", OfflineDefaults())


__all__ = [
    "DEFAULT_CONFIG_FIELDS",
    "DEFAULT_LOG_SUFFIXES",
    "DEFAULT_SUCCESS_MARKERS",
    "ENV_PREFIX",
    "OfflineDefaults",
    "default_config_path",
    "default_state_dir",
    "is_unconfigured",
    "unconfigured_offline_settings",
]
