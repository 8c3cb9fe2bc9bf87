"""The pydantic-free defaults that ``analyze --offline`` runs on when nothing is configured."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.defaults import (
    OfflineDefaults,
    default_config_path,
    is_unconfigured,
)
from daemon.settings import Settings

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
EXP = "results/ttc_scaling_20260125"


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple | list):
        return list(value)
    return value


@pytest.mark.parametrize("section", ["analyze", "classify"])
def test_every_light_default_equals_the_pydantic_default(section: str) -> None:
    light = getattr(OfflineDefaults(), section)
    real = getattr(Settings(), section)
    names = [f.name for f in dataclasses.fields(light)]
    # the light section covers the whole pydantic section: a new setting must be added
    assert set(names) == set(type(real).model_fields)
    for name in names:
        assert _plain(getattr(light, name)) == _plain(getattr(real, name)), name


def test_light_resubmit_policy_equals_the_pydantic_default() -> None:
    light = OfflineDefaults().resubmit
    real = Settings().resubmit
    assert light.retryable_types == real.retryable_types
    assert list(light.scripts) == real.scripts == []


def test_unconfigured_only_without_file_flag_or_variable(tmp_path: Path) -> None:
    assert is_unconfigured(None, {})
    assert not is_unconfigured(tmp_path / "settings.toml", {})
    # pydantic-settings matches the prefix whatever its case
    assert not is_unconfigured(None, {"SLURM_TRIAGE_CLASSIFY__SUCCESS_MARKERS": "[]"})
    assert not is_unconfigured(None, {"slurm_triage_analyze__log_suffixes": "[]"})
    assert is_unconfigured(None, {"SLURM_OTHER": "1"})
    path = default_config_path()
    path.parent.mkdir(parents=True)
    path.symlink_to(tmp_path / "missing.toml")  # even a dangling link: let load_settings say so
    assert not is_unconfigured(None, {})


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    dst = tmp_path / "ex"
    shutil.copytree(EXAMPLES, dst, ignore=shutil.ignore_patterns("failed_jobs.csv", "*.py"))
    monkeypatch.chdir(dst)
    return dst


def test_unconfigured_analyze_equals_the_pydantic_path(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert main(["analyze", "logs", EXP, "--offline", "--json", "--csv", "light.csv"]) == 0
    light = json.loads(capsys.readouterr().out)
    argv = ["analyze", "logs", EXP, "--offline", "--json", "--csv", "full.csv"]
    assert main([*argv, "--config", str(empty)]) == 0
    full = json.loads(capsys.readouterr().out)
    light["summary"].pop("csv_path")
    full["summary"].pop("csv_path")
    assert light == full
    assert light["failures"]  # the examples do fail: the comparison is not vacuous
    assert Path("light.csv").read_text() == Path("full.csv").read_text()


def test_unconfigured_offline_analyze_never_imports_pydantic(tree: Path) -> None:
    code = (
        "import sys\n"
        "from daemon.cli import main\n"
        f"rc = main(['analyze', 'logs', {EXP!r}, '--offline', '--csv', 'x.csv'])\n"
        "print(rc, sorted(m for m in sys.modules if m.split('.')[0].startswith('pydantic')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SLURM_TRIAGE_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "0 []"
    # with a settings file the real loader runs (and validates it)
    (tree / "s.toml").write_text("[analyze]\ncluster_min_count = 2\n")
    code = code.replace("'--offline',", "'--offline', '--config', 's.toml',")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "pydantic" in out.stdout.splitlines()[-1]
