"""Logging through structlog: JSON lines for journald, readable lines on a terminal.

The stdlib loggers of apscheduler and slack_sdk go through the same pipeline, so a
journal holds one format. Values that look like secrets are masked before rendering.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

_SECRET_KEYS = re.compile(r"token|secret|password|webhook|authorization", re.IGNORECASE)
_SECRET_VALUES = re.compile(
    r"(xox[abprs]-[A-Za-z0-9-]+|https://hooks\.slack\.com/services/[^\s\"']+)"
)


def mask_secrets(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key, value in list(event_dict.items()):
        if key != "event" and _SECRET_KEYS.search(key) and value is not None:
            event_dict[key] = "**********"
        elif isinstance(value, str) and _SECRET_VALUES.search(value):
            event_dict[key] = _SECRET_VALUES.sub("**********", value)
    return event_dict


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    import structlog

    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        mask_secrets,
    ]
    renderer: Any
    if use_json:
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False)
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # apscheduler logs every run at INFO; keep its warnings (missed/skipped runs)
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger("slack_sdk").setLevel(max(logging.INFO, logging.getLevelName(level)))
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def get_logger(name: str) -> Any:
    import structlog

    return structlog.stdlib.get_logger(name)
