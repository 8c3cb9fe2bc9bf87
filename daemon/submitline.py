"""Rebuild an ``sbatch`` argv from sacct's ``SubmitLine`` + ``WorkDir`` (pure).

sacct stores the submit command as sbatch's argv joined by single spaces: shell quoting
is gone (``--comment="a b"`` comes back as ``--comment=a b``) and a relative script path
stays relative to the submission folder. We therefore split on whitespace and accept the
result only when it is unambiguous: every word is a known sbatch option (with its value),
the script (which must exist, checked through an injected ``exists`` callable so this
module never touches the disk), or an argument after the script. Anything else is refused
with a reason; a resubmission is never guessed.

Known limit: arguments *after* the script that contained spaces cannot be detected (any
word there is a valid argument); the settings ``scripts`` table is the escape hatch.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import SubmitError

if TYPE_CHECKING:
    from .settings import ScriptSetting

TAG_PREFIX = "slurm-triage:"

Exists = Callable[[str], bool]

_REQUIRED = "required"
_OPTIONAL = "optional"  # only ``--name=value`` attaches a value; a bare ``--name`` is a flag
_FLAG = "flag"

# sbatch (22.05 … 24.x) long options and whether they take a value. A value option given
# as ``--name value`` consumes the next word; that is how getopt_long parses it too.
_LONG: dict[str, str] = {
    **{
        name: _REQUIRED
        for name in (
            "account acctg-freq array batch bb bbf begin chdir cluster-constraint clusters "
            "comment constraint container container-id core-spec cores-per-socket cpu-freq "
            "cpus-per-gpu cpus-per-task deadline delay-boot dependency distribution error "
            "exclude export export-file extra-node-info gid gpu-bind gpu-freq gpus "
            "gpus-per-node gpus-per-socket gpus-per-task gres gres-flags hint input job-name "
            "kill-on-invalid-dep licenses mail-type mail-user mcs-label mem mem-bind "
            "mem-per-cpu mem-per-gpu mincpus network nodefile nodelist nodes ntasks "
            "ntasks-per-core ntasks-per-gpu ntasks-per-node ntasks-per-socket open-mode output "
            "partition power prefer priority profile qos reservation signal sockets-per-node "
            "switches thread-spec threads-per-core time time-min tmp tres-per-task uid "
            "wait-all-nodes wckey wrap"
        ).split()
    },
    **{name: _OPTIONAL for name in "exclusive get-user-env nice no-kill propagate".split()},
    **{
        name: _FLAG
        for name in (
            "contiguous hold ignore-pbs no-requeue overcommit oversubscribe parsable quiet "
            "reboot requeue spread-job test-only use-min-nodes verbose wait"
        ).split()
    },
}

_SHORT_VALUE: dict[str, str] = {
    "A": "account",
    "a": "array",
    "b": "begin",
    "B": "extra-node-info",
    "C": "constraint",
    "c": "cpus-per-task",
    "D": "chdir",
    "d": "dependency",
    "e": "error",
    "F": "nodefile",
    "G": "gpus",
    "i": "input",
    "J": "job-name",
    "L": "licenses",
    "M": "clusters",
    "m": "distribution",
    "N": "nodes",
    "n": "ntasks",
    "o": "output",
    "p": "partition",
    "q": "qos",
    "S": "core-spec",
    "t": "time",
    "w": "nodelist",
    "x": "exclude",
}
_SHORT_FLAG: dict[str, str] = {
    "H": "hold",
    "k": "no-kill",
    "O": "overcommit",
    "Q": "quiet",
    "s": "oversubscribe",
    "v": "verbose",
    "W": "wait",
}

# Replaced by the resubmission (array, begin, parsable, comment=tag), meaningless for a
# retry (dependency on a job long gone), or harmful to the protocol (--wait blocks sbatch
# past its timeout; --test-only submits nothing).
DROPPED_OPTIONS: frozenset[str] = frozenset(
    {"array", "begin", "parsable", "comment", "dependency", "wait", "test-only"}
)


class CannotRebuild(SubmitError):
    """The original submit command cannot be rebuilt without guessing."""


@dataclass(frozen=True, slots=True)
class SbatchOption:
    name: str  # canonical long name, no dashes ("time")
    value: str | None
    tokens: tuple[str, ...]  # the words as given, re-emitted verbatim when kept


@dataclass(frozen=True, slots=True)
class SubmitCommand:
    """An sbatch submission split into options, script and script arguments."""

    options: tuple[SbatchOption, ...]
    script: str
    script_args: tuple[str, ...]
    work_dir: str
    source: str  # "submit_line" or "scripts:<job name pattern>"

    def option(self, name: str) -> SbatchOption | None:
        """The effective (last) occurrence of an option, as sbatch applies it."""
        found = None
        for opt in self.options:
            if opt.name == name:
                found = opt
        return found

    def array_throttle(self) -> int | None:
        """The ``%N`` of the original ``--array`` (max tasks running at once), if any."""
        opt = self.option("array")
        if opt is None or opt.value is None or "%" not in opt.value:
            return None
        tail = opt.value.rsplit("%", 1)[1].strip()
        return int(tail) if tail.isdigit() and int(tail) > 0 else None


def _resolve_long(name: str) -> str | None:
    if name in _LONG:
        return name
    # getopt_long accepts any unambiguous prefix (``--part=gpu``)
    matches = [n for n in _LONG if n.startswith(name)]
    return matches[0] if len(matches) == 1 else None


def _script_path(work_dir: str, script: str) -> str:
    return os.path.join(work_dir, script) if work_dir else script


def parse_options(
    words: Sequence[str], *, where: str = "SubmitLine"
) -> tuple[list[SbatchOption], int]:
    """Parse leading sbatch options; returns them and the index of the first non-option word.

    Raises CannotRebuild on an unknown option, a flag given a value, or a missing value.
    """
    opts: list[SbatchOption] = []
    i = 0
    n = len(words)
    while i < n:
        word = words[i]
        if word == "--":
            return opts, i + 1
        if word.startswith("--"):
            raw, eq, val = word[2:].partition("=")
            name = _resolve_long(raw)
            if name is None:
                raise CannotRebuild(f"{where}: unknown sbatch option {word.split('=')[0]!r}")
            kind = _LONG[name]
            if kind == _FLAG:
                if eq:
                    raise CannotRebuild(f"{where}: sbatch option --{name} takes no value")
                opts.append(SbatchOption(name, None, (word,)))
            elif kind == _OPTIONAL:
                opts.append(SbatchOption(name, val if eq else None, (word,)))
            elif eq:
                opts.append(SbatchOption(name, val, (word,)))
            else:
                if i + 1 >= n:
                    raise CannotRebuild(f"{where}: sbatch option --{name} has no value")
                opts.append(SbatchOption(name, words[i + 1], (word, words[i + 1])))
                i += 1
        elif word.startswith("-") and len(word) > 1:
            letter = word[1]
            if letter in _SHORT_VALUE:
                name = _SHORT_VALUE[letter]
                if len(word) > 2:
                    opts.append(SbatchOption(name, word[2:], (word,)))
                else:
                    if i + 1 >= n:
                        raise CannotRebuild(f"{where}: sbatch option {word} has no value")
                    opts.append(SbatchOption(name, words[i + 1], (word, words[i + 1])))
                    i += 1
            elif all(ch in _SHORT_FLAG for ch in word[1:]):
                for ch in word[1:]:
                    opts.append(SbatchOption(_SHORT_FLAG[ch], None, (f"-{ch}",)))
            else:
                raise CannotRebuild(f"{where}: unknown sbatch option {word!r}")
        else:
            return opts, i
        i += 1
    return opts, n


def parse_submit_line(line: str, work_dir: str, exists: Exists) -> SubmitCommand:
    """Split sacct's SubmitLine into a SubmitCommand, or raise CannotRebuild saying why."""
    words = line.split()
    if not words:
        raise CannotRebuild("sacct has no SubmitLine for this job")
    if os.path.basename(words[0]) != "sbatch":
        raise CannotRebuild(f"SubmitLine is not an sbatch command: {words[0]!r}")
    if not work_dir:
        raise CannotRebuild("sacct has no WorkDir for this job")
    body = words[1:]
    opts, script_at = parse_options(body)
    if any(o.name == "wrap" for o in opts):
        raise CannotRebuild("submitted with --wrap, whose command lost its quoting in SubmitLine")
    if script_at >= len(body):
        raise CannotRebuild("SubmitLine names no script (submitted from standard input?)")
    _check_values_followed_by_script(body, opts, script_at, work_dir, exists)
    script = body[script_at]
    if not exists(_script_path(work_dir, script)):
        raise CannotRebuild(f"script not found: {_script_path(work_dir, script)}")
    return SubmitCommand(
        options=tuple(opts),
        script=script,
        script_args=tuple(body[script_at + 1 :]),
        work_dir=work_dir,
        source="submit_line",
    )


def _check_values_followed_by_script(
    body: Sequence[str], opts: Sequence[SbatchOption], script_at: int, work_dir: str, exists: Exists
) -> None:
    """The last value option must be followed by the script: else its value may have had spaces.

    Only the word right after the options can be the place where a quoted value was cut:
    every earlier word was consumed as an option or a value. If that word is not an
    existing script but a later word is, the line is ambiguous (``--comment=a b run.sh``).
    """
    if not opts or opts[-1].value is None:
        return
    candidate = body[script_at]
    if exists(_script_path(work_dir, candidate)):
        return
    for later in body[script_at + 1 :]:
        if not later.startswith("-") and exists(_script_path(work_dir, later)):
            raise CannotRebuild(
                f"ambiguous SubmitLine: the value of {opts[-1].tokens[0]!r} may have contained "
                f"spaces lost by sacct ({candidate!r} is neither an option nor the script)"
            )


def match_script_setting(job_name: str, scripts: Iterable[ScriptSetting]) -> ScriptSetting | None:
    for entry in scripts:
        if fnmatch.fnmatchcase(job_name, entry.job_name):
            return entry
    return None


def from_script_setting(entry: ScriptSetting, work_dir: str, exists: Exists) -> SubmitCommand:
    """A SubmitCommand from the settings ``scripts`` table (already argv-split: no guessing)."""
    folder = entry.work_dir or work_dir
    if not folder:
        raise CannotRebuild(f"scripts entry {entry.job_name!r} has no work_dir and sacct none")
    opts, rest = parse_options(entry.sbatch_args, where=f"scripts[{entry.job_name}].sbatch_args")
    if rest != len(entry.sbatch_args):
        raise CannotRebuild(
            f"scripts[{entry.job_name}].sbatch_args: {entry.sbatch_args[rest]!r} is not an option"
        )
    if any(o.name == "wrap" for o in opts):
        raise CannotRebuild(f"scripts[{entry.job_name}].sbatch_args: --wrap is not supported")
    if not exists(_script_path(folder, entry.script)):
        raise CannotRebuild(f"script not found: {_script_path(folder, entry.script)}")
    return SubmitCommand(
        options=tuple(opts),
        script=entry.script,
        script_args=tuple(entry.args),
        work_dir=folder,
        source=f"scripts:{entry.job_name}",
    )


def build_argv(
    cmd: SubmitCommand,
    *,
    tag: str,
    sbatch: str = "sbatch",
    array: str | None = None,
    begin_delay_s: int = 0,
    overrides: Mapping[str, str] | None = None,
) -> list[str]:
    """The resubmission argv: the original options minus DROPPED_OPTIONS, plus ours.

    ``overrides`` replace an option's value in place (``time``, ``mem``) or are appended.
    ``--chdir`` is pinned to the absolute WorkDir: a relative one was relative to a
    folder sacct does not record.
    """
    wanted = dict(overrides or {})
    if cmd.option("chdir") is not None:
        wanted.setdefault("chdir", cmd.work_dir)
    argv = [sbatch, "--parsable"]
    done: set[str] = set()
    for opt in cmd.options:
        if opt.name in DROPPED_OPTIONS:
            continue
        if opt.name in wanted:
            if opt.name not in done:
                argv.append(f"--{opt.name}={wanted[opt.name]}")
                done.add(opt.name)
            continue
        argv.extend(opt.tokens)
    for name, value in wanted.items():
        if name not in done:
            argv.append(f"--{name}={value}")
    if array is not None:
        argv.append(f"--array={array}")
    if begin_delay_s > 0:
        argv.append(f"--begin=now+{int(begin_delay_s)}")
    argv.append(f"--comment={TAG_PREFIX}{tag}")
    argv.append(cmd.script)
    argv.extend(cmd.script_args)
    return argv


# --- resource values ---------------------------------------------------------------------

_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)
_MEM_UNIT_MIB = {"K": 1 / 1024, "M": 1.0, "": 1.0, "G": 1024.0, "T": 1024.0 * 1024.0}


def parse_mem_mib(text: str) -> int:
    """``"4G"`` -> 4096; sbatch's default unit is megabytes. Raises ValueError."""
    m = _MEM_RE.match(text)
    if not m:
        raise ValueError(f"not a memory size: {text!r}")
    return max(1, math.ceil(float(m[1]) * _MEM_UNIT_MIB[m[2].upper()]))


def format_mem(mib: int) -> str:
    return f"{mib // 1024}G" if mib % 1024 == 0 else f"{mib}M"


def parse_time_s(text: str) -> int:
    """Slurm time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S. Raises ValueError."""
    t = text.strip()
    days = 0
    if "-" in t:
        d, t = t.split("-", 1)
        days = int(d)
        parts = [int(p) for p in t.split(":")]
        if len(parts) == 1:
            h, mi, s = parts[0], 0, 0
        elif len(parts) == 2:
            h, mi, s = parts[0], parts[1], 0
        elif len(parts) == 3:
            h, mi, s = parts
        else:
            raise ValueError(f"not a Slurm time: {text!r}")
    else:
        parts = [int(p) for p in t.split(":")]
        if len(parts) == 1:
            h, mi, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, mi, s = 0, parts[0], parts[1]
        elif len(parts) == 3:
            h, mi, s = parts
        else:
            raise ValueError(f"not a Slurm time: {text!r}")
    if min(days, h, mi, s) < 0:
        raise ValueError(f"not a Slurm time: {text!r}")
    return ((days * 24 + h) * 60 + mi) * 60 + s


def format_time_s(seconds: int) -> str:
    days, rem = divmod(max(0, int(seconds)), 86400)
    h, rem = divmod(rem, 3600)
    mi, s = divmod(rem, 60)
    clock = f"{h:02d}:{mi:02d}:{s:02d}"
    return f"{days}-{clock}" if days else clock


def escalate(current: int, factor: float, ceiling: int | None) -> int:
    """``current * factor`` rounded up, never above ``ceiling`` (nor below ``current``)."""
    grown = math.ceil(current * factor)
    if ceiling is not None:
        grown = min(grown, max(ceiling, current))
    return max(grown, current)
