"""Command line: parse arguments, call a command, render its typed result, map errors to exit codes.

Heavy modules are imported inside the handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from . import __version__
from .errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, TriageError, UsageError

if TYPE_CHECKING:
    from .settings import Settings


class CommandResult(Protocol):
    """What every command returns: rendering happens here, once."""

    def to_json(self) -> Any: ...

    def render_text(self) -> str: ...

    @property
    def exit_code(self) -> int: ...


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse prints usage + exits 2; keep it one line
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="PATH",
        type=Path,
        default=argparse.SUPPRESS,
        help="settings file (default ~/.config/slurm-triage/settings.toml)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="slurm-triage",
        description="Explain failed Slurm jobs, report them, resubmit the retryable ones (opt-in).",
    )
    parser.add_argument("--version", action="version", version=f"slurm-triage {__version__}")
    _add_config(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("analyze", help="one-shot analysis of a folder of job logs")
    p.add_argument("log_dir", metavar="LOG_DIR", type=Path)
    p.add_argument("results_dir", metavar="RESULTS_DIR", type=Path, nargs="?")
    p.add_argument("--jobs", metavar="ID,ID", help="only these job ids")
    p.add_argument("--csv", metavar="PATH", type=Path, help="where to write failed_jobs.csv")
    p.add_argument("--offline", action="store_true", help="run no Slurm command (logs only)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_config(p)

    p = sub.add_parser("classify", help="classify job log files")
    p.add_argument("files", metavar="FILE", nargs="+", type=Path)
    p.add_argument("--json", action="store_true", help="print a JSON list on stdout")
    _add_config(p)

    p = sub.add_parser("run", help="run the daemon (until SIGTERM), or one tick with --once")
    p.add_argument("--once", action="store_true", help="do one tick and exit")
    _add_config(p)

    p = sub.add_parser("status", help="what the daemon knows: jobs, failures, last tick, backlog")
    p.add_argument("--json", action="store_true")
    _add_config(p)

    p = sub.add_parser("resubmit", help="resubmit retryable failures through the daemon's path")
    p.add_argument("--dry-run", action="store_true", help="show what would be submitted")
    p.add_argument("--type", dest="types", action="append", metavar="TYPE", help="only this type")
    p.add_argument("--jobs", metavar="ID,ID", help="only these job ids")
    p.add_argument("--resume", action="store_true", help="lift a billing pause")
    p.add_argument("--json", action="store_true")
    _add_config(p)

    p = sub.add_parser("config", help="check or show the effective settings")
    csub = p.add_subparsers(dest="config_command", metavar="check|show", parser_class=_Parser)
    for name, helptext in (("check", "validate settings"), ("show", "print effective settings")):
        cp = csub.add_parser(name, help=helptext)
        _add_config(cp)
        cp.add_argument("--json", action="store_true")

    p = sub.add_parser("notify", help="Slack delivery")
    nsub = p.add_subparsers(dest="notify_command", metavar="test", parser_class=_Parser)
    np_ = nsub.add_parser("test", help="send a test message and explain any failure")
    _add_config(np_)
    np_.add_argument("--json", action="store_true")
    return parser


def parse_job_ids(text: str | None) -> list[str] | None:
    if text is None:
        return None
    ids = [part.strip() for part in text.split(",") if part.strip()]
    for job_id in ids:
        head = job_id.split("_", 1)[0]
        if not head.isdigit():
            raise UsageError(f"--jobs: not a job id: {job_id!r}")
    if not ids:
        raise UsageError("--jobs: empty list")
    return ids


def _load(args: argparse.Namespace) -> Settings:
    from .settings import load_settings

    return load_settings(getattr(args, "config", None))


def _dispatch(args: argparse.Namespace) -> CommandResult | int:
    cmd = args.command
    if cmd == "analyze":
        from .analyze import run_analyze
        from .defaults import is_unconfigured, unconfigured_offline_settings

        # Nothing to validate and nothing to ask Slurm: skip pydantic's import altogether
        settings = (
            unconfigured_offline_settings()
            if args.offline and is_unconfigured(getattr(args, "config", None))
            else _load(args)
        )
        return run_analyze(
            settings,
            log_dir=args.log_dir,
            results_dir=args.results_dir,
            jobs=parse_job_ids(args.jobs),
            csv_path=args.csv,
            offline=args.offline,
            progress=sys.stderr.isatty() and not args.json,
        )
    if cmd == "classify":
        from .classify import classify_files

        return classify_files(args.files, _load(args))
    if cmd == "run":
        from .service import run_service

        return run_service(_load(args), once=args.once)
    if cmd == "status":
        from .service import collect_status

        return collect_status(_load(args))
    if cmd == "resubmit":
        from .resubmit import run_manual

        return run_manual(
            _load(args),
            dry_run=args.dry_run,
            types=args.types,
            jobs=parse_job_ids(args.jobs),
            resume=args.resume,
        )
    if cmd == "config":
        from .configcmd import config_check, config_show

        if args.config_command == "check":
            return config_check(getattr(args, "config", None))
        if args.config_command == "show":
            return config_show(getattr(args, "config", None))
        raise UsageError("config: choose check or show")
    if cmd == "notify":
        from .notify import send_test

        if args.notify_command == "test":
            return send_test(_load(args))
        raise UsageError("notify: choose test")
    raise UsageError("choose a command (see --help)")


# Commands that only read and print: once their output is flushed nothing is left to
# clean up, and skipping the interpreter's teardown (which frees every object of a large
# analysis one by one) saves ~0.1 s of a typical run.
_ONE_SHOT = frozenset({"analyze", "classify"})


def entry() -> NoReturn:
    """The ``slurm-triage`` console command."""
    code, command = _main(None)
    if command in _ONE_SHOT:
        with contextlib.suppress(OSError):  # a reader that went away (| head)
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    return _main(argv)[0]


def _main(argv: Sequence[str] | None) -> tuple[int, str | None]:
    """(exit status, command that ran)."""
    parser = build_parser()
    command: str | None = None
    try:
        args = parser.parse_args(argv)
        command = getattr(args, "command", None)
        return _run_command(args), command
    except TriageError as exc:
        sys.stderr.write(f"slurm-triage: error: {_one_line(str(exc))}\n")
        return exc.exit_code, command
    except KeyboardInterrupt:
        sys.stderr.write("slurm-triage: interrupted\n")
        return 130, command
    except BrokenPipeError:
        return EXIT_OK, command


def _run_command(args: argparse.Namespace) -> int:
    want_json = bool(getattr(args, "json", False))
    result = _dispatch(args)
    if isinstance(result, int):
        return result
    if want_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
    else:
        text = result.render_text()
        if text:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()
    return result.exit_code


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"


__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "entry", "main"]

if __name__ == "__main__":
    entry()
