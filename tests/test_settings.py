from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import tomllib
from pydantic import BaseModel, SecretStr

from daemon.errors import ConfigError
from daemon.settings import Settings, default_config_path, load_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "settings.example.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _leaf_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names += _leaf_names(ann, f"{prefix}{name}.")
        else:
            names.append(f"{prefix}{name}")
    return names


def test_example_file_values_are_the_defaults() -> None:
    loaded = load_settings(EXAMPLE)
    assert loaded.source_path == EXAMPLE
    defaults = Settings()
    got = loaded.model_dump(mode="json")
    want = defaults.model_dump(mode="json")
    # state_dir depends on $XDG_STATE_HOME, so the example only shows it commented out
    assert got == want, "settings.example.toml drifted from the defaults in daemon/settings.py"


def test_example_file_documents_every_setting() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    keys = set(re.findall(r"^#?\s*([a-z_]+) = ", text, flags=re.MULTILINE))
    sections = set(re.findall(r"^\[([a-z_.]+)\]", text, flags=re.MULTILINE))
    # a dict-valued setting (analyze.config_fields, resubmit.types) is documented as tables
    missing = [
        n
        for n in _leaf_names(Settings)
        if n.rsplit(".", 1)[-1] not in keys
        and not any(s == n or s.startswith(n + ".") for s in sections)
    ]
    assert missing == [], f"add these to settings.example.toml: {missing}"
    for name, info in Settings.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            assert name in sections or any(s.startswith(name + ".") for s in sections), name


def test_example_parses_as_plain_toml() -> None:
    doc = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert doc["resubmit"]["enabled"] is False


def test_default_path_may_be_absent() -> None:
    assert not default_config_path().exists()
    settings = load_settings()
    assert settings.source_path is None
    assert settings.watch.interval_s == 60.0


def test_default_path_is_used_when_present() -> None:
    path = default_config_path()
    path.parent.mkdir(parents=True)
    path.write_text("[watch]\ninterval_s = 15\n")
    settings = load_settings()
    assert settings.source_path == path
    assert settings.watch.interval_s == 15


def test_explicit_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="settings file not found"):
        load_settings(tmp_path / "nope.toml")


def test_directory_as_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a file"):
        load_settings(tmp_path)


def test_invalid_toml_is_one_line_config_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "[watch]\ninterval_s = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    msg = str(info.value)
    assert "invalid TOML" in msg and str(path) in msg
    assert "\n" not in msg
    assert isinstance(info.value.__cause__, ValueError)


def test_env_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, '[watch]\ninterval_s = 30\n[slack]\nmode = "webhook"\n')
    monkeypatch.setenv("SLURM_TRIAGE_WATCH__INTERVAL_S", "90")
    settings = load_settings(path)
    assert settings.watch.interval_s == 90
    assert settings.slack.mode == "webhook"  # untouched keys still come from the file


def test_nested_env_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_TRIAGE_SLACK__WEBHOOK_URL", "https://hooks.example/T0/B0/sekrit")
    settings = load_settings()
    assert isinstance(settings.slack.webhook_url, SecretStr)
    assert settings.slack.webhook_url.get_secret_value() == "https://hooks.example/T0/B0/sekrit"


def test_env_json_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLURM_TRIAGE_WATCH__LOG_DIRS", f'["{tmp_path}"]')
    assert load_settings().watch.log_dirs == [tmp_path]


def test_unknown_key_in_file_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "[watch]\nintervall_s = 30\n")
    with pytest.raises(ConfigError, match=r"watch\.intervall_s: unknown setting"):
        load_settings(path)


def test_unknown_section_in_file_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "[slak]\nmode = 'bot'\n")
    with pytest.raises(ConfigError, match=r"slak: unknown setting"):
        load_settings(path)


def test_unknown_nested_env_key_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    # a typo inside a known section is an error, like in the file
    monkeypatch.setenv("SLURM_TRIAGE_SLACK__WEBHOK_URL", "https://x")
    with pytest.raises(ConfigError, match=r"slack\.webhok_url: unknown setting"):
        load_settings()


def test_unknown_top_level_env_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # Decision: SLURM_TRIAGE_<NAME> without a section is not validated, because the
    # prefix is shared with non-settings variables (SLURM_TRIAGE_CRASH_AT for fault tests).
    monkeypatch.setenv("SLURM_TRIAGE_CRASH_AT", "nowhere")
    monkeypatch.setenv("SLURM_TRIAGE_SOMETHING", "1")
    assert load_settings().slack.mode == "off"


def test_bad_value_names_the_setting(tmp_path: Path) -> None:
    path = _write(tmp_path, "[watch]\ninterval_s = -1\n")
    with pytest.raises(ConfigError, match=r"watch\.interval_s: .*must be > 0"):
        load_settings(path)


def test_never_retryable_type_cannot_be_enabled(tmp_path: Path) -> None:
    path = _write(tmp_path, "[resubmit.types.billing]\nenabled = true\n")
    with pytest.raises(ConfigError, match="can never be resubmitted: billing"):
        load_settings(path)


def test_partial_type_policy_keeps_other_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "[resubmit.types.oom]\nenabled = true\nescalate_factor = 2.0\n")
    types = {t.value: p for t, p in load_settings(path).resubmit.types.items()}
    assert types["oom"].enabled and types["oom"].escalate_factor == 2.0
    assert types["rate_limit"].enabled and types["rate_limit"].base_delay_s == 300.0


@pytest.mark.parametrize("secret_field", ["webhook_url", "bot_token"])
def test_secrets_masked_everywhere(tmp_path: Path, secret_field: str) -> None:
    secret = "xoxb-very-secret-value-123"
    path = _write(tmp_path, f'[slack]\nmode = "bot"\n{secret_field} = "{secret}"\n')
    settings = load_settings(path)
    renderings: list[Any] = [
        repr(settings),
        str(settings),
        repr(settings.slack),
        settings.model_dump_json(),
        str(settings.model_dump()),
        str(settings.model_dump(mode="json")),
    ]
    for text in renderings:
        assert secret not in text
    assert "**********" in settings.model_dump_json()
    assert getattr(settings.slack, secret_field).get_secret_value() == secret
