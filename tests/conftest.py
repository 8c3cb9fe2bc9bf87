from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _isolate_environment(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No test reads the developer's real settings, state, proxies or Slack secrets."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local" / "state"))
    for name in list(os.environ):
        if name.startswith("SLURM_TRIAGE_") or name.lower() in {
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "no_proxy",
        }:
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _verify_ledger_row_cache(
    _isolate_environment: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Every ledger save in every test re-checks the cached rows (a stale one means a
    record field was changed in place, which the change tracking cannot see). The env
    var reaches the daemons that reliability tests run as child processes."""
    from daemon import ledger

    monkeypatch.setenv(ledger.VERIFY_ENV, "1")
    monkeypatch.setattr(ledger, "VERIFY_ROW_CACHE", True)
    ledger.stale_rows_seen.clear()
    yield
    # a tick stage turns the AssertionError into a tick error and goes on: fail here too
    stale, ledger.stale_rows_seen[:] = list(ledger.stale_rows_seen), []
    assert not stale, stale[0]
