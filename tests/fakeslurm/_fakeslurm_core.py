"""A stateful fake of sacct/squeue/sbatch/scancel (Slurm 22.05.8 output shapes).

Independent of the ``daemon`` package on purpose: tests parse its output with the real
parsers, so it must not share their code. The state is a JSON file named by
``FAKESLURM_STATE``; every command takes an exclusive lock on ``<state>.lock`` while it
reads and writes it. Output formats and error messages were copied from real 22.05.8
output (tests/fixtures/slurm); see tests/fakeslurm/README.md.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

TIME_FMT = "%Y-%m-%dT%H:%M:%S"

# Fields this fake (like 22.05.8) knows; anything else is rejected as real sacct does.
SACCT_KNOWN = {
    "jobid": "JobID",
    "jobidraw": "JobIDRaw",
    "jobname": "JobName",
    "user": "User",
    "state": "State",
    "exitcode": "ExitCode",
    "submit": "Submit",
    "start": "Start",
    "end": "End",
    "elapsed": "Elapsed",
    "totalcpu": "TotalCPU",
    "timelimit": "Timelimit",
    "alloccpus": "AllocCPUS",
    "nodelist": "NodeList",
    "reason": "Reason",
    "workdir": "WorkDir",
    "comment": "Comment",
    "submitline": "SubmitLine",
    "account": "Account",
    "partition": "Partition",
    "eligible": "Eligible",
}
FINISHED = {
    "COMPLETED",
    "FAILED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "CANCELLED",
    "BOOT_FAIL",
    "DEADLINE",
}
SQUEUE_STATES = {
    "PENDING": "PD",
    "RUNNING": "R",
    "SUSPENDED": "S",
    "COMPLETING": "CG",
    "COMPLETED": "CD",
    "CONFIGURING": "CF",
    "CANCELLED": "CA",
    "FAILED": "F",
    "TIMEOUT": "TO",
    "PREEMPTED": "PR",
    "BOOT_FAIL": "BF",
    "NODE_FAIL": "NF",
    "REVOKED": "RV",
    "SPECIAL_EXIT": "SE",
    "RESV_DEL_HOLD": "RD",
    "REQUEUE_FED": "RF",
    "REQUEUE_HOLD": "RH",
    "REQUEUED": "RQ",
    "RESIZING": "RS",
    "SIGNALING": "SI",
    "STAGE_OUT": "SO",
    "STOPPED": "ST",
    "DEADLINE": "DL",
    "OUT_OF_MEMORY": "OOM",
}
VALID_LIST = (
    "PENDING,RUNNING,SUSPENDED,COMPLETED,CANCELLED,FAILED,TIMEOUT,NODE_FAIL,PREEMPTED,"
    "BOOT_FAIL,DEADLINE,OUT_OF_MEMORY,COMPLETING,CONFIGURING,RESIZING,RESV_DEL_HOLD,"
    "REQUEUED,REQUEUE_FED,REQUEUE_HOLD,REVOKED,SIGNALING,SPECIAL_EXIT,STAGE_OUT,STOPPED"
).split(",")
# squeue with no --states shows these (as real squeue does)
SQUEUE_DEFAULT = {"PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING"}


# --------------------------------------------------------------------------- state


def state_path() -> Path:
    value = os.environ.get("FAKESLURM_STATE")
    if not value:
        raise SystemExit("fakeslurm: FAKESLURM_STATE is not set")
    return Path(value)


def new_state(user: str, node: str, min_job_age: int, first_id: int) -> dict[str, Any]:
    return {
        "user": user,
        "uid": os.getuid(),
        "node": node,
        "min_job_age": min_job_age,
        "next_id": first_id,
        "now": None,
        "jobs": [],
        "submissions": [],
        "calls": [],
        "faults": {},
        "rejected_fields": [],
    }


@contextmanager
def locked_state(path: Path | None = None) -> Iterator[dict[str, Any]]:
    path = path or state_path()
    with open(str(path) + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text())
        yield data
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)


def now_of(state: dict[str, Any]) -> float:
    return float(state["now"]) if state.get("now") is not None else time.time()


def take_fault(state: dict[str, Any], cmd: str, kinds: set[str]) -> dict[str, Any] | None:
    faults = state["faults"].get(cmd, [])
    for i, fault in enumerate(faults):
        if fault["kind"] in kinds:
            if fault.get("times") is not None:
                fault["times"] -= 1
                if fault["times"] <= 0:
                    faults.pop(i)
            return dict(fault)
    return None


# --------------------------------------------------------------------------- formatting


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "Unknown"
    return datetime.fromtimestamp(ts).strftime(TIME_FMT)


def fmt_duration(seconds: float) -> str:
    s = int(seconds)
    days, rest = divmod(s, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    core = f"{h:02d}:{m:02d}:{sec:02d}"
    return f"{days}-{core}" if days else core


def fmt_total_cpu(seconds: float) -> str:
    # sacct's _elapsed_time(): D-HH:MM:SS, HH:MM:SS, MM:SS.mmm when there are
    # sub-seconds, else 00:MM:SS (so zero is "00:00:00", as real rows show)
    if seconds >= 3600:
        return fmt_duration(seconds)
    whole = int(seconds)
    msec = round((seconds - whole) * 1000)
    m, sec = divmod(whole, 60)
    return f"{m:02d}:{sec:02d}.{msec:03d}" if msec else f"00:{m:02d}:{sec:02d}"


def fmt_limit(minutes: int | None) -> str:
    return "UNLIMITED" if minutes is None else fmt_duration(minutes * 60)


def compress(indices: list[int]) -> str:
    ordered = sorted(set(indices))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def expand(spec: str) -> list[int]:
    body = spec.split("%", 1)[0]
    out: list[int] = []
    for part in body.split(","):
        step = 1
        if ":" in part:
            part, step_s = part.split(":", 1)
            step = int(step_s)
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1, step))
        elif part:
            out.append(int(part))
    return out


def parse_when(text: str, now: float) -> float:
    text = text.strip()
    m = re.fullmatch(r"now(?:([+-])(\d+)(seconds?|minutes?|hours?|days?|s|m|h|d)?)?", text)
    if m:
        if not m[1]:
            return now
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[(m[3] or "s")[0]]
        return now + (1 if m[1] == "+" else -1) * int(m[2]) * unit
    for fmt in (TIME_FMT, "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return datetime.strptime(text, fmt).timestamp()
        except ValueError:
            continue
    raise ValueError(text)


# --------------------------------------------------------------------------- job model


def display_id(job: dict[str, Any]) -> str:
    if job.get("array_job_id") is None:
        return str(job["job_id"])
    return f"{job['array_job_id']}_{job['array_task']}"


def unsplit(job: dict[str, Any]) -> bool:
    """A pending array task still held in the master record (no own id yet)."""
    return job.get("array_job_id") is not None and job.get("job_id") is None


def state_text(job: dict[str, Any]) -> str:
    if job["state"] == "CANCELLED":
        return f"CANCELLED by {job.get('cancelled_by', 0)}"
    return str(job["state"])


def elapsed(job: dict[str, Any], now: float) -> float:
    if job.get("start") is None:
        return 0.0
    end = job["end"] if job.get("end") is not None else now
    return max(0.0, end - job["start"])


def in_placeholder(job: dict[str, Any]) -> bool:
    return job["state"] in FINISHED and bool(job.get("placeholder"))


def sacct_value(job: dict[str, Any], field: str, state: dict[str, Any], raw_id: str) -> str:
    now = now_of(state)
    f = field.lower()
    ph = in_placeholder(job)
    if f == "jobid":
        return display_id(job) if not job.get("_group") else job["_group"]
    if f == "jobidraw":
        return raw_id
    if f == "jobname":
        return "allocation" if ph else job["name"]
    if f == "user":
        return job["user"]
    if f == "state":
        return state_text(job)
    if f == "exitcode":
        return job.get("exit_code") or "0:0"
    if f == "submit":
        return fmt_time(job["submit"])
    if f == "eligible":
        return fmt_time(job.get("begin") or job["submit"])
    if f == "start":
        if job.get("start") is None and job["state"] == "CANCELLED":
            return "None"  # cancelled before it ever started
        return fmt_time(job.get("start"))
    if f == "end":
        return fmt_time(job.get("end"))
    if f == "elapsed":
        return fmt_duration(elapsed(job, now))
    if f == "totalcpu":
        return fmt_total_cpu(float(job.get("total_cpu") or 0.0))
    if f == "timelimit":
        if ph:
            return ""
        if job.get("timelimit_min") is None and job["state"] == "PENDING":
            return "Partition_Limit"
        return fmt_limit(job.get("timelimit_min"))
    if f == "alloccpus":
        return str(job.get("cpus", 1))
    if f == "nodelist":
        return "None assigned" if job.get("start") is None else state["node"]
    if f == "reason":
        return job.get("reason") or "None"
    if f == "workdir":
        return "" if ph else job["work_dir"]
    if f == "comment":
        return job.get("comment", "")
    if f == "submitline":
        return "" if ph else job.get("submit_line", "")
    if f == "account":
        return job.get("account", "testbed")
    if f == "partition":
        return job.get("partition", "debug")
    raise KeyError(field)


def ids_match(job: dict[str, Any], wanted: set[str]) -> bool:
    if not wanted:
        return True
    own = {display_id(job)}
    if job.get("job_id") is not None:
        own.add(str(job["job_id"]))
    if job.get("array_job_id") is not None:
        own.add(str(job["array_job_id"]))
    return bool(own & wanted)


# --------------------------------------------------------------------------- argv parsing


def split_opts(
    argv: list[str],
    with_value: dict[str, str],
    flags: dict[str, str],
    *,
    stop_at_positional: bool = False,
) -> tuple[dict[str, str], list[str], str | None]:
    """Minimal getopt_long: returns (options by canonical name, positionals, bad option).

    ``stop_at_positional``: like sbatch (optstring "+"), everything from the first
    positional on (the script and its arguments) is left alone."""
    opts: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i + 1 :])
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            key = "--" + name
            if key in with_value:
                if not eq:
                    i += 1
                    if i >= len(argv):
                        return opts, rest, arg
                    value = argv[i]
                opts[with_value[key]] = value
            elif key in flags:
                opts[flags[key]] = ""
            else:
                return opts, rest, arg
        elif arg.startswith("-") and len(arg) > 1:
            key = arg[:2]
            if key in with_value:
                value = arg[2:]
                if not value:
                    i += 1
                    if i >= len(argv):
                        return opts, rest, arg
                    value = argv[i]
                opts[with_value[key]] = value
            elif key in flags:
                opts[flags[key]] = ""
                for extra in arg[2:]:
                    if "-" + extra not in flags:
                        return opts, rest, "-" + extra
                    opts[flags["-" + extra]] = ""
            else:
                return opts, rest, arg
        else:
            if stop_at_positional:
                rest.extend(argv[i:])
                break
            rest.append(arg)
        i += 1
    return opts, rest, None


# --------------------------------------------------------------------------- commands


def apply_faults(cmd: str, state: dict[str, Any]) -> tuple[int | None, str, str, float]:
    """Returns (rc or None to proceed, stdout, stderr, seconds to hang first)."""
    hang = take_fault(state, cmd, {"hang"})
    delay = float(hang["seconds"]) if hang else 0.0
    fail = take_fault(state, cmd, {"fail"})
    if fail:
        return int(fail["rc"]), "", str(fail["stderr"]), delay
    garbage = take_fault(state, cmd, {"garbage"})
    if garbage:
        return 0, str(garbage["text"]), "", delay
    return None, "", "", delay


Outcome = tuple[int, str, str, float]


def finish_output(rc: int, out: str, err: str, delay: float) -> Outcome:
    """What to print, and how long to hang first. Printed by ``main`` after the state is
    saved and unlocked, so a hung (and killed) command has already recorded its effects
    and does not block other commands."""
    return rc, out, err, delay


def cmd_sacct(argv: list[str]) -> Outcome:
    with_value = {
        "--format": "format",
        "-o": "format",
        "--user": "user",
        "-u": "user",
        "--jobs": "jobs",
        "-j": "jobs",
        "--starttime": "start",
        "-S": "start",
        "--endtime": "end",
        "-E": "end",
        "--delimiter": "delimiter",
        "--state": "states",
        "-s": "states",
    }
    flags = {
        "-X": "allocations",
        "--allocations": "allocations",
        "--parsable2": "parsable2",
        "-P": "parsable2",
        "--noheader": "noheader",
        "-n": "noheader",
        "--allusers": "allusers",
        "-a": "allusers",
        "--duplicates": "duplicates",
        "-D": "duplicates",
    }
    with locked_state() as state:
        state["calls"].append({"cmd": "sacct", "argv": argv})
        rc, out, err, delay = apply_faults("sacct", state)
        if rc is not None:
            return finish_output(rc, out, err, delay)
        opts, _rest, bad = split_opts(argv, with_value, flags)
        if bad is not None:
            return finish_output(1, "", f"sacct: unrecognized option '{bad}'\n", delay)
        if "parsable2" not in opts:
            return finish_output(1, "", "fakeslurm sacct: only --parsable2 is implemented\n", 0)
        fields = [f.split("%", 1)[0] for f in opts.get("format", "JobID,JobName,State").split(",")]
        rejected = {r.lower() for r in state.get("rejected_fields", [])}
        for f in fields:
            if f.lower() not in SACCT_KNOWN or f.lower() in rejected:
                return finish_output(1, "", f'sacct: error: Invalid field requested: "{f}"\n', 0)
        now = now_of(state)
        try:
            wanted = set(filter(None, opts.get("jobs", "").split(",")))
            if "start" in opts:
                start = parse_when(opts["start"], now)
            elif wanted:
                start = 0.0
            else:
                start = datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0).timestamp()
            end = parse_when(opts["end"], now) if "end" in opts else now
        except ValueError as exc:
            return finish_output(1, "", f"sacct: error: Invalid time specification: {exc}\n", 0)
        # like sacct: without -u, -j shows any user's job; otherwise only the caller's
        users = set(opts["user"].split(",")) if "user" in opts else {state["user"]}
        all_users = "allusers" in opts or ("user" not in opts and bool(wanted))
        delim = opts.get("delimiter", "|")
        lines: list[str] = []
        if "noheader" not in opts:
            lines.append(delim.join(SACCT_KNOWN[f.lower()] for f in fields))
        for job, raw in visible_sacct_jobs(state, wanted, users, start, end, all_users):
            lines.append(delim.join(sacct_value(job, f, state, raw) for f in fields))
            if "allocations" not in opts and job.get("start") is not None and not job.get("_group"):
                for step in ("batch", "extern"):
                    step_job = dict(job, name=step, comment="", submit_line="", work_dir="")
                    step_job["_group"] = f"{display_id(job)}.{step}"
                    lines.append(
                        delim.join(sacct_value(step_job, f, state, f"{raw}.{step}") for f in fields)
                    )
        return finish_output(0, "".join(line + "\n" for line in lines), "", delay)


def visible_sacct_jobs(
    state: dict[str, Any],
    wanted: set[str],
    users: set[str],
    start: float,
    end: float,
    all_users: bool,
) -> list[tuple[dict[str, Any], str]]:
    shown: list[tuple[dict[str, Any], str]] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for job in state["jobs"]:
        if not all_users and job["user"] not in users:
            continue
        if not ids_match(job, wanted):
            continue
        # like sacct: a window only shows jobs eligible in it (a held or future --begin
        # job is not); -j without -S shows them anyway (start defaults to the epoch)
        eligible = None if job.get("held") else max(job["submit"], job.get("begin") or 0)
        if not (wanted and start == 0.0):
            if eligible is None or eligible > end:
                continue
        elif job["submit"] > end:
            continue
        if job.get("end") is not None and job["end"] < start:
            continue
        if unsplit(job):
            groups.setdefault((str(job["array_job_id"]), job["state"]), []).append(job)
            continue
        shown.append((job, str(job["job_id"])))
    for (master, _state), tasks in groups.items():
        # sacct -X prints the not-yet-started part of an array as one row: 12_[3-5]
        group = dict(tasks[0], _group=f"{master}_[{compress([t['array_task'] for t in tasks])}]")
        shown.append((group, master))
    shown.sort(key=lambda pair: (int(pair[1]), pair[0].get("array_task") or 0))
    return shown


def squeue_fields(fmt: str) -> list[tuple[str, str]]:
    """Split a squeue --format into (literal text, field letter) pairs."""
    out: list[tuple[str, str]] = []
    literal = ""
    i = 0
    while i < len(fmt):
        ch = fmt[i]
        if ch == "%":
            m = re.match(r"%(\.?)(-?)(\d*)([A-Za-z%])", fmt[i:])
            if m is None:
                literal += ch
                i += 1
                continue
            if m[4] == "%":
                literal += "%"
            else:
                out.append((literal, m[4]))
                literal = ""
            i += len(m[0])
        else:
            literal += ch
            i += 1
    if literal:
        out.append((literal, ""))
    return out


def squeue_value(job: dict[str, Any], letter: str, state: dict[str, Any], group: str | None) -> str:
    now = now_of(state)
    if letter == "i":
        return group or display_id(job)
    if letter == "A":
        return str(job["job_id"]) if job.get("job_id") is not None else str(job["array_job_id"])
    if letter == "F":
        return str(job.get("array_job_id") or job["job_id"])
    if letter == "K":
        return "N/A" if job.get("array_task") is None else str(job["array_task"])
    if letter == "T":
        return str(job["state"])
    if letter == "t":
        return SQUEUE_STATES.get(job["state"], job["state"])
    if letter == "j":
        return str(job["name"])
    if letter == "u":
        return str(job["user"])
    if letter == "k":
        return str(job.get("comment") or "(null)")
    if letter == "r":
        return str(job.get("reason") or "None")
    if letter == "M":
        return fmt_duration(elapsed(job, now)).lstrip("0:") or "0:00"
    if letter == "P":
        return str(job.get("partition", "debug"))
    if letter == "a":
        return str(job.get("account", "testbed"))
    if letter == "N":
        return "" if job.get("start") is None else str(state["node"])
    return ""


def cmd_squeue(argv: list[str]) -> Outcome:
    with_value = {
        "--format": "format",
        "-o": "format",
        "--user": "user",
        "-u": "user",
        "--jobs": "jobs",
        "-j": "jobs",
        "--states": "states",
        "-t": "states",
    }
    flags = {"--noheader": "noheader", "-h": "noheader", "-r": "array", "--array": "array"}
    with locked_state() as state:
        state["calls"].append({"cmd": "squeue", "argv": argv})
        rc, out, err, delay = apply_faults("squeue", state)
        if rc is not None:
            return finish_output(rc, out, err, delay)
        opts, _rest, bad = split_opts(argv, with_value, flags)
        if bad is not None:
            return finish_output(1, "", f"squeue: unrecognized option '{bad}'\n", delay)
        wanted_states: set[str] = set()
        for s in filter(None, opts.get("states", "").split(",")):
            s = s.upper()
            if s == "ALL":
                wanted_states |= set(SQUEUE_STATES)
            elif s in SQUEUE_STATES:
                wanted_states.add(s)
            elif s in SQUEUE_STATES.values():
                wanted_states.add(next(k for k, v in SQUEUE_STATES.items() if v == s))
            else:
                msg = (
                    f"squeue: error: Invalid job state specified: {s}\n"
                    "squeue: error: Valid job states include: " + ",".join(VALID_LIST) + "\n\n"
                )
                return finish_output(1, "", msg, 0)
        wanted_states = wanted_states or SQUEUE_DEFAULT
        wanted = set(filter(None, opts.get("jobs", "").split(",")))
        now = now_of(state)
        in_memory = [
            j
            for j in state["jobs"]
            if j["state"] not in FINISHED or (j.get("end") or now) >= now - state["min_job_age"]
        ]
        if wanted and not any(ids_match(j, wanted) for j in in_memory):
            return finish_output(1, "", "slurm_load_jobs error: Invalid job id specified\n", delay)
        users = set(filter(None, opts.get("user", "").split(",")))
        rows: list[tuple[dict[str, Any], str | None]] = []
        groups: dict[str, list[dict[str, Any]]] = {}
        for job in in_memory:
            if users and job["user"] not in users:
                continue
            if not ids_match(job, wanted) or job["state"] not in wanted_states:
                continue
            if unsplit(job) and "array" not in opts:
                groups.setdefault(str(job["array_job_id"]), []).append(job)
                continue
            rows.append((job, None))
        for master, tasks in groups.items():
            rows.append((tasks[0], f"{master}_[{compress([t['array_task'] for t in tasks])}]"))
        parts = squeue_fields(opts.get("format", "%.18i %.9P %.8j %.8u %.2t %.10M %.6D %R"))
        lines = []
        for job, group in rows:
            lines.append(
                "".join(lit + squeue_value(job, letter, state, group) for lit, letter in parts)
            )
        return finish_output(0, "".join(line + "\n" for line in lines), "", delay)


SBATCH_VALUE = {
    "--array": "array",
    "-a": "array",
    "--job-name": "job_name",
    "-J": "job_name",
    "--comment": "comment",
    "--begin": "begin",
    "-b": "begin",
    "--time": "time",
    "-t": "time",
    "--chdir": "chdir",
    "-D": "chdir",
    "--output": "output",
    "-o": "output",
    "--error": "error",
    "-e": "error",
    "--mem": "mem",
    "--mem-per-cpu": "mem_per_cpu",
    "--partition": "partition",
    "-p": "partition",
    "--account": "account",
    "-A": "account",
    "--cpus-per-task": "cpus",
    "-c": "cpus",
    "--ntasks": "ntasks",
    "-n": "ntasks",
    "--nodes": "nodes",
    "-N": "nodes",
    "--dependency": "dependency",
    "-d": "dependency",
    "--gres": "gres",
    "--qos": "qos",
    "--export": "export",
    "--mail-type": "mail_type",
}
SBATCH_FLAGS = {"--parsable": "parsable", "--hold": "hold", "-H": "hold", "--requeue": "requeue"}
SBATCH_VALUE["--wrap"] = "wrap"


def parse_minutes(text: str) -> int:
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if m is None:
        raise ValueError(text)
    days = int(m[1] or 0)
    a, b, c = m[2], m[3], m[4]
    if m[1] is not None:  # D-H[:M[:S]]
        minutes = int(a) * 60 + int(b or 0)
        secs = int(c or 0)
    elif c is not None:  # H:M:S
        minutes, secs = int(a) * 60 + int(b), int(c)
    elif b is not None:  # M:S
        minutes, secs = int(a), int(b)
    else:  # M
        minutes, secs = int(a), 0
    return days * 1440 + minutes + (1 if secs else 0)


def script_directives(path: Path) -> list[str]:
    args: list[str] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return args
    for line in lines[1:] if lines and lines[0].startswith("#!") else lines:
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not stripped.startswith("#SBATCH")):
            continue
        if not stripped.startswith("#SBATCH"):
            break  # directives after the first command are ignored, as by sbatch
        args.extend(stripped[len("#SBATCH") :].split())
    return args


def expand_log_name(pattern: str, job: dict[str, Any], raw_id: str) -> str:
    repl = {
        "%A": str(job.get("array_job_id") or raw_id),
        "%a": str(job["array_task"]) if job.get("array_task") is not None else "4294967294",
        "%j": raw_id,
        "%x": str(job["name"]),
        "%u": str(job["user"]),
        "%N": "fakenode",
        "%%": "%",
    }
    return re.sub(r"%[AajxuN%]", lambda m: repl[m[0]], pattern)


def cmd_sbatch(argv: list[str]) -> Outcome:
    cwd = os.getcwd()
    with locked_state() as state:
        state["calls"].append({"cmd": "sbatch", "argv": argv})
        record: dict[str, Any] = {"argv": ["sbatch", *argv], "cwd": cwd, "job_id": None, "rc": 0}
        state["submissions"].append(record)
        rc, out, err, delay = apply_faults("sbatch", state)
        if rc is not None:
            record["rc"] = rc
            return finish_output(rc, out, err, delay)
        opts, rest, bad = split_opts(argv, SBATCH_VALUE, SBATCH_FLAGS, stop_at_positional=True)
        if bad is not None:
            record["rc"] = 255  # getopt failure: sbatch exits 255 (real 22.05.8)
            msg = (
                f"sbatch: unrecognized option '{bad}'\nTry \"sbatch --help\" for more information\n"
            )
            return finish_output(255, "", msg, delay)
        if "wrap" in opts:
            script = Path(cwd, "wrap")
            dir_opts: dict[str, str] = {}
        elif not rest:
            record["rc"] = 1
            return finish_output(1, "", "sbatch: error: Batch job submission failed: \n", delay)
        else:
            script = Path(cwd, rest[0])
            if not script.is_file():
                record["rc"] = 1
                msg = f"sbatch: error: Unable to open file {rest[0]}\n"
                return finish_output(1, "", msg, delay)
            dir_opts, _, _ = split_opts(script_directives(script), SBATCH_VALUE, SBATCH_FLAGS)
        merged = {**dir_opts, **opts}  # the command line wins over #SBATCH lines
        now = now_of(state)
        try:
            begin = parse_when(merged["begin"], now) if "begin" in merged else None
            limit = parse_minutes(merged["time"]) if "time" in merged else None
            tasks = expand(merged["array"]) if "array" in merged else None
        except ValueError as exc:
            record["rc"] = 1
            return finish_output(1, "", f"sbatch: error: Invalid argument: {exc}\n", delay)
        work_dir = str(Path(cwd, merged.get("chdir", ".")).resolve())
        master = str(state["next_id"])
        state["next_id"] += 1
        base = {
            "name": merged.get("job_name", script.name),
            "user": state["user"],
            "state": "PENDING",
            "exit_code": "0:0",
            "submit": now,
            "begin": begin,
            "start": None,
            "end": None,
            "total_cpu": 0.0,
            "timelimit_min": limit,
            "work_dir": work_dir,
            "submit_line": " ".join(["sbatch", *argv]),
            "comment": merged.get("comment", ""),
            "held": "hold" in merged,
            "reason": "JobHeldUser"
            if "hold" in merged
            else "BeginTime"
            if begin is not None and begin > now
            else "None",
            "output": merged.get("output", "slurm-%A_%a.out" if tasks else "slurm-%j.out"),
            "error": merged.get("error", merged.get("output", "")),
            "script": str(script),
        }
        if tasks is None:
            state["jobs"].append(dict(base, job_id=master, array_job_id=None, array_task=None))
        else:
            for t in tasks:
                state["jobs"].append(dict(base, job_id=None, array_job_id=master, array_task=t))
        record["job_id"] = master
        hang = take_fault(state, "sbatch", {"hang_after_submit"})
        if hang:
            delay = max(delay, float(hang["seconds"]))
        out = f"{master}\n" if "parsable" in merged else f"Submitted batch job {master}\n"
    # printed by main() outside the lock: the job is recorded before a hang, so a caller
    # that times out and kills sbatch leaves an accepted job behind
    return finish_output(0, out, "", delay)


def cmd_scancel(argv: list[str]) -> Outcome:
    with locked_state() as state:
        state["calls"].append({"cmd": "scancel", "argv": argv})
        rc, out, err, delay = apply_faults("scancel", state)
        if rc is not None:
            return finish_output(rc, out, err, delay)
        errors = []
        for wanted in argv:
            if wanted.startswith("-"):
                continue
            hit = False
            for job in state["jobs"]:
                if ids_match(job, {wanted}):
                    hit = True
                    if job["state"] not in FINISHED:
                        cancel(state, job)
            if not hit and not re.fullmatch(r"\d+(?:_\d+)?", wanted):
                errors.append(f"scancel: error: Invalid job id {wanted}\n")
            # an unknown numeric id: real 22.05.8 scancel prints nothing and exits 0
        return finish_output(1 if errors else 0, "", "".join(errors), delay)


def split_off(state: dict[str, Any], job: dict[str, Any]) -> None:
    """An array task leaving PENDING gets its own id; the last one keeps the master id."""
    if not unsplit(job):
        return
    master = job["array_job_id"]
    others = [
        j for j in state["jobs"] if j is not job and unsplit(j) and j["array_job_id"] == master
    ]
    if others:
        job["job_id"] = str(state["next_id"])
        state["next_id"] += 1
    else:
        job["job_id"] = str(master)


def cancel(state: dict[str, Any], job: dict[str, Any]) -> None:
    now = now_of(state)
    if job.get("start") is not None:
        split_off(state, job)  # a pending array task cancelled stays in the group row
    job["state"] = "CANCELLED"
    job["cancelled_by"] = state["uid"]
    job["exit_code"] = "0:0"
    job["end"] = now
    job["reason"] = "None"


def main(cmd: str, argv: list[str]) -> int:
    handlers = {
        "sacct": cmd_sacct,
        "squeue": cmd_squeue,
        "sbatch": cmd_sbatch,
        "scancel": cmd_scancel,
    }
    rc, out, err, delay = handlers[cmd](argv)
    if delay:
        time.sleep(delay)
    try:
        sys.stdout.write(out)
        sys.stderr.write(err)
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        return 1
    return rc


def default_user() -> str:
    return getpass.getuser()
