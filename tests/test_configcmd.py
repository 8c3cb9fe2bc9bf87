from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib

from daemon.cli import main
from daemon.configcmd import config_check, config_show
from daemon.errors import EXIT_CONFIG, EXIT_OK
from daemon.settings import load_settings

SECRET = "https://hooks.slack.example/services/T000/B000/very-secret-token"


def _cfg(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["config", "check", "--config", str(path)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_valid_settings_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    path = _cfg(tmp_path, f'[watch]\nlog_dirs = ["{logs}"]\n')
    rc, out, _ = _check(path, capsys)
    assert rc == EXIT_OK
    assert f"settings: {path}" in out
    assert "error:" not in out
    assert out.rstrip().splitlines()[-1].startswith("OK")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[slack]\nmode = "webhook"\n', "slack.webhook_url is not set"),
        ('[slack]\nmode = "webhook"\nwebhook_url = "http://plain"\n', "https:// URL"),
        ('[slack]\nmode = "bot"\nchannel = "#x"\n', "slack.bot_token is not set"),
        ('[slack]\nmode = "bot"\nbot_token = "xoxb-1"\n', "slack.channel is not set"),
        ('[watch]\nlog_dirs = ["/does/not/exist"]\n', "folder does not exist: /does/not/exist"),
        ('[notify]\ndaily_summary_at = "9am"\n', "must be HH:MM"),
        ('[notify]\ndaily_summary_at = "24:00"\n', "must be HH:MM"),
        ('[[classify.signatures]]\ntype = "network"\npattern = "(unclosed"\n', "invalid regex"),
        ('[analyze]\nlog_name_patterns = ["(?P<task>\\\\d+)"]\n', "(?P<job>...)"),
    ],
)
def test_semantic_problems_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, message: str
) -> None:
    rc, out, _ = _check(_cfg(tmp_path, toml), capsys)
    assert rc == EXIT_CONFIG
    assert message in out
    assert "problem(s)" in out


def test_schema_error_is_one_line_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = _check(_cfg(tmp_path, "[watch]\ninterval = 5\n"), capsys)
    assert rc == EXIT_CONFIG
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("slurm-triage: error:") and "watch.interval: unknown setting" in err


def test_invalid_toml_exit_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _check(_cfg(tmp_path, "[watch\n"), capsys)
    assert rc == EXIT_CONFIG
    assert "invalid TOML" in err and "Traceback" not in err


def test_missing_config_path_exit_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _check(tmp_path / "missing.toml", capsys)
    assert rc == EXIT_CONFIG
    assert "settings file not found" in err


def test_world_readable_secret_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = f'[slack]\nmode = "webhook"\nwebhook_url = "{SECRET}"\n'
    rc, out, _ = _check(_cfg(tmp_path, text, mode=0o644), capsys)
    assert rc == EXIT_OK  # a warning, not an error
    assert "readable by other users" in out and "chmod 600" in out
    assert SECRET not in out
    rc, out, _ = _check(_cfg(tmp_path, text, mode=0o600), capsys)
    assert rc == EXIT_OK and "readable by other users" not in out


def test_secret_from_env_with_readable_file_does_not_warn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_TRIAGE_SLACK__WEBHOOK_URL", SECRET)
    result = config_check(_cfg(tmp_path, '[slack]\nmode = "webhook"\n', mode=0o644))
    assert result.ok
    assert not any("readable" in w for w in result.warnings)


def test_resubmit_without_scripts_warns(tmp_path: Path) -> None:
    result = config_check(_cfg(tmp_path, "[resubmit]\nenabled = true\n"))
    assert result.exit_code == EXIT_OK
    assert any("cannot be rebuilt" in w for w in result.warnings)
    assert any("Slack is off" in w for w in result.warnings)


def test_check_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _cfg(tmp_path, '[slack]\nmode = "bot"\n')
    rc = main(["config", "check", "--config", str(path), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == EXIT_CONFIG
    assert doc["ok"] is False and doc["source"] == str(path)
    assert len(doc["errors"]) == 2


def test_check_without_file_uses_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["config", "check"])
    out = capsys.readouterr().out
    assert rc == EXIT_OK
    assert "no settings file" in out


def test_show_masks_secrets_and_names_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _cfg(tmp_path, f'[slack]\nmode = "webhook"\nwebhook_url = "{SECRET}"\n')
    assert main(["config", "show", "--config", str(path)]) == EXIT_OK
    text = capsys.readouterr().out
    assert SECRET not in text
    assert 'webhook_url = "**********"' in text
    assert str(path) in text.splitlines()[0]
    assert main(["config", "show", "--config", str(path), "--json"]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["source"] == str(path)
    assert doc["settings"]["slack"]["webhook_url"] == "**********"
    assert doc["settings"]["slack"]["bot_token"] is None


def test_show_text_is_toml_that_loads_back(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    path = _cfg(
        tmp_path,
        f'[watch]\nlog_dirs = ["{logs}"]\ninterval_s = 42\n'
        '[[classify.signatures]]\ntype = "network"\npattern = "conn\\\\w+ reset"\n'
        '[resubmit.types.oom]\nenabled = true\nescalate_factor = 1.5\nescalate_ceiling = "64G"\n',
    )
    shown = config_show(path)
    text = shown.render_text()
    tomllib.loads(text)  # valid TOML
    again = tmp_path / "x"
    again.mkdir()
    again = _cfg(again, text)
    assert load_settings(again).model_dump(mode="json") == shown.values
