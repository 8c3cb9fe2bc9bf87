"""`slurm-triage config check` and `config show`.

``check`` loads the settings (a ConfigError propagates: the CLI prints it and exits 78)
and then looks for problems the schema cannot see: a Slack mode without its secret,
watched folders that do not exist, regexes that do not compile. Problems exit 78;
warnings are printed and exit 0. ``show`` prints the effective values, secrets masked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EXIT_CONFIG, EXIT_OK
from .settings import Settings, load_settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MASK = "**********"
_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


@dataclass
class ConfigCheckResult:
    source: Path | None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_CONFIG

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "source": str(self.source) if self.source else None,
            "errors": self.errors,
            "warnings": self.warnings,
        }

    def render_text(self) -> str:
        where = str(self.source) if self.source else "defaults and environment (no settings file)"
        lines = [f"settings: {where}"]
        lines += [f"error: {e}" for e in self.errors]
        lines += [f"warning: {w}" for w in self.warnings]
        if self.ok:
            lines.append("OK" if not self.warnings else f"OK with {len(self.warnings)} warning(s)")
        else:
            lines.append(
                f"{len(self.errors)} problem(s); fix them and run `slurm-triage config check`"
            )
        return "\n".join(lines)


@dataclass
class ConfigShowResult:
    source: Path | None
    values: dict[str, Any]  # JSON-native, secrets masked

    exit_code: int = EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {"source": str(self.source) if self.source else None, "settings": self.values}

    def render_text(self) -> str:
        head = f"# effective settings; file: {self.source or '(none: defaults and environment)'}"
        return head + "\n" + render_toml(self.values)


def masked_values(settings: Settings) -> dict[str, Any]:
    """JSON-native dump; pydantic renders a set SecretStr as ``**********``."""
    values: dict[str, Any] = settings.model_dump(mode="json")
    return values


def config_show(path: Path | None) -> ConfigShowResult:
    settings = load_settings(path)
    return ConfigShowResult(source=settings.source_path, values=masked_values(settings))


def config_check(path: Path | None) -> ConfigCheckResult:
    settings = load_settings(path)
    result = ConfigCheckResult(source=settings.source_path)
    errors, warnings = result.errors, result.warnings

    slack = settings.slack
    if slack.mode == "webhook":
        if slack.webhook_url is None or not slack.webhook_url.get_secret_value():
            errors.append(
                "slack.mode is 'webhook' but slack.webhook_url is not set "
                "(or set SLURM_TRIAGE_SLACK__WEBHOOK_URL)"
            )
        elif not slack.webhook_url.get_secret_value().startswith("https://"):
            errors.append("slack.webhook_url must be an https:// URL")
    elif slack.mode == "bot":
        if slack.bot_token is None or not slack.bot_token.get_secret_value():
            errors.append(
                "slack.mode is 'bot' but slack.bot_token is not set "
                "(or set SLURM_TRIAGE_SLACK__BOT_TOKEN)"
            )
        if not slack.channel:
            errors.append("slack.mode is 'bot' but slack.channel is not set")
    elif slack.webhook_url is not None or slack.bot_token is not None:
        warnings.append("a Slack secret is set but slack.mode is 'off': nothing will be sent")

    for name, dirs in (("watch.log_dirs", settings.watch.log_dirs),):
        for d in dirs:
            if not d.exists():
                errors.append(f"{name}: folder does not exist: {d}")
            elif not d.is_dir():
                errors.append(f"{name}: not a folder: {d}")
    for d in settings.watch.results_dirs:
        if not d.is_dir():
            warnings.append(f"watch.results_dirs: folder does not exist (yet): {d}")
    if not settings.watch.log_dirs:
        warnings.append("watch.log_dirs is empty: the daemon classifies from sacct only")

    when = settings.notify.daily_summary_at
    if when is not None and not _HHMM.match(when):
        errors.append(f"notify.daily_summary_at must be HH:MM (24 h), got {when!r}")

    for i, sig in enumerate(settings.classify.signatures):
        try:
            re.compile(sig.pattern)
        except re.error as exc:
            errors.append(f"classify.signatures[{i}].pattern: invalid regex: {exc}")
    for i, pat in enumerate(settings.analyze.log_name_patterns):
        try:
            compiled = re.compile(pat)
        except re.error as exc:
            errors.append(f"analyze.log_name_patterns[{i}]: invalid regex: {exc}")
            continue
        if "job" not in compiled.groupindex:
            errors.append(f"analyze.log_name_patterns[{i}]: needs a named group (?P<job>...)")

    state_dir = settings.state_dir
    if state_dir.exists() and not state_dir.is_dir():
        errors.append(f"state_dir is not a folder: {state_dir}")

    rs = settings.resubmit
    if rs.enabled:
        if not any(p.enabled for p in rs.types.values()):
            warnings.append("resubmit.enabled is true but every resubmit.types entry is disabled")
        if not rs.scripts:
            warnings.append(
                "resubmit.enabled is true with no [[resubmit.scripts]]: jobs whose sacct "
                "SubmitLine is missing (Slurm < 21.08, or purged) cannot be rebuilt and "
                "will only be reported"
            )
        if slack.mode == "off":
            warnings.append(
                "resubmit.enabled is true but Slack is off: resubmissions go unreported"
            )
    for i, script in enumerate(rs.scripts):
        if not Path(script.script).expanduser().exists() and script.work_dir is None:
            warnings.append(f"resubmit.scripts[{i}].script not found: {script.script}")

    for name in ("sacct", "squeue", "sbatch"):
        exe = getattr(settings.slurm, name)
        if shutil.which(exe) is None:
            warnings.append(
                f"slurm.{name}: {exe!r} not found on PATH (only `analyze --offline` works)"
            )

    src = settings.source_path
    if src is not None and _file_has_secret(src):
        mode = os.stat(src).st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            warnings.append(
                f"{src} holds a Slack secret and is readable by other users "
                f"(mode {stat.S_IMODE(mode):o}); run: chmod 600 {src}"
            )
    return result


def _file_has_secret(path: Path) -> bool:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    slack = doc.get("slack")
    return isinstance(slack, dict) and bool(slack.get("webhook_url") or slack.get("bot_token"))


# --- TOML-ish rendering ------------------------------------------------------------------


def render_toml(values: dict[str, Any]) -> str:
    """Render a JSON-native dict as TOML. ``None`` has no TOML form: shown commented out."""
    lines: list[str] = []
    _render_table(values, [], lines)
    return "\n".join(lines).strip() + "\n"


def _render_table(table: dict[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not _is_subtable(v)}
    for key, value in scalars.items():
        if value is None:
            lines.append(f"# {_key(key)} = (not set)")
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in table.items():
        if isinstance(value, dict) and key not in scalars:
            name = ".".join(_key(p) for p in [*path, key])
            lines += ["", f"[{name}]"]
            _render_table(value, [*path, key], lines)
        elif isinstance(value, list) and key not in scalars:
            name = ".".join(_key(p) for p in [*path, key])
            for item in value:
                lines += ["", f"[[{name}]]"]
                _render_table(item, [*path, key], lines)


def _is_subtable(value: Any) -> bool:
    if isinstance(value, dict):
        # a table of scalars (e.g. analyze.config_fields) is still a table in TOML
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE.match(key) else json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are valid TOML basic-string escapes
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + inner + " }" if inner else "{}"
    return json.dumps(value)
