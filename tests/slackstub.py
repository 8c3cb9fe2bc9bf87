"""A local stand-in for Slack's Web API and incoming webhooks (a real HTTP server).

Speaks enough of the wire protocol that slack-sdk's real clients work against it:
``POST /api/chat.postMessage`` (JSON body, Bearer token), ``/api/conversations.history``
(query or form parameters), ``/api/auth.test``, and ``POST /services/T/B/X`` webhooks.
Response shapes follow Slack's documentation: Web API errors are HTTP 200 with
``{"ok": false, "error": "..."}``, rate limits are HTTP 429 with ``Retry-After``,
webhook errors are plain-text bodies with 4xx statuses (``404 no_service``).

Faults are programmable per request (``fail_next``) or persistent (``down``), and
``stop()``/``start()`` close and reopen the port to produce "connection refused".
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "xoxb-test-token"
WEBHOOK_PATH = "/services/T000/B000/XXXX"


@dataclass
class Fault:
    """One programmed failure. ``kind``: 429, 500, 503, slow, error, post_then_slow."""

    kind: str
    path: str | None = None  # only requests whose path contains this
    retry_after: float = 1.0
    error: str = ""
    delay_s: float = 0.0


@dataclass
class Recorded:
    path: str
    at: float  # from the stub's clock (inject a fake clock to check rates)
    params: dict[str, Any]
    status: int
    authorized: bool


@dataclass
class Posted:
    ts: str
    channel: str
    text: str
    blocks: list[dict[str, Any]]
    thread_ts: str | None
    metadata: dict[str, Any] | None
    via: str  # "api" or "webhook"
    at: float


@dataclass
class SlackStub:
    clock: Callable[[], float] = time.monotonic
    token: str = TOKEN
    # channel name or id -> id
    channels: dict[str, str] = field(
        default_factory=lambda: {"#alerts": "C0ALERTS", "C0ALERTS": "C0ALERTS"}
    )
    not_member: set[str] = field(default_factory=set)  # channel ids the bot is not in
    webhook_paths: set[str] = field(default_factory=lambda: {WEBHOOK_PATH})
    revoked_webhooks: set[str] = field(default_factory=set)
    down: int | None = None  # a status code every request gets (e.g. 503)
    requests: list[Recorded] = field(default_factory=list)
    posted: list[Posted] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self._seq = 0

    # lifecycle ---------------------------------------------------------------------------

    def start(self) -> SlackStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                stub._handle(self)

            def do_GET(self) -> None:
                stub._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the port: clients now get "connection refused"."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{WEBHOOK_PATH}"

    def fail_next(self, kind: str, count: int = 1, **kw: Any) -> None:
        with self._lock:
            self.faults.extend(Fault(kind=kind, **kw) for _ in range(count))

    # helpers for assertions -----------------------------------------------------------

    def dedup_keys(self) -> list[str]:
        return [
            str(((p.metadata or {}).get("event_payload") or {}).get("dedup_key"))
            for p in self.posted
        ]

    def post_requests(self) -> list[Recorded]:
        return [
            r
            for r in self.requests
            if r.path.endswith("chat.postMessage") or "/services/" in r.path
        ]

    # request handling -----------------------------------------------------------------

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for i, fault in enumerate(self.faults):
                if fault.path is None or fault.path in path:
                    return self.faults.pop(i)
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        params: dict[str, Any] = {k: v[0] for k, v in parse_qs(url.query).items()}
        ctype = h.headers.get("Content-Type") or ""
        if raw:
            if "json" in ctype:
                params.update(json.loads(raw.decode("utf-8")))
            else:
                params.update({k: v[0] for k, v in parse_qs(raw.decode("utf-8")).items()})
        auth = h.headers.get("Authorization") or ""
        authorized = auth == f"Bearer {self.token}"

        status, headers, body = self._respond(url.path, params, authorized, bool(auth))
        with self._lock:
            self.requests.append(Recorded(url.path, self.clock(), params, status, authorized))
        if body is None:  # a dropped connection
            return
        data = body if isinstance(body, bytes) else body.encode("utf-8")
        try:
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout); that is the point of the slow faults

    def _respond(
        self, path: str, params: dict[str, Any], authorized: bool, has_auth: bool
    ) -> tuple[int, dict[str, str], str | bytes | None]:
        is_api = path.startswith("/api/")
        fault = self._take_fault(path)
        if self.down is not None:
            return self.down, {"Content-Type": "text/html"}, "<html>Service Unavailable</html>"
        if fault is not None:
            if fault.kind == "429":
                body = (
                    json.dumps({"ok": False, "error": "ratelimited"}) if is_api else "rate_limited"
                )
                return 429, {"Retry-After": str(int(fault.retry_after))}, body
            if fault.kind in ("500", "503"):
                return int(fault.kind), {"Content-Type": "text/html"}, "<html>Server Error</html>"
            if fault.kind == "slow":
                time.sleep(fault.delay_s)
            if fault.kind == "error":
                if is_api:
                    return 200, _json_ct(), json.dumps({"ok": False, "error": fault.error})
                status = {"no_service": 404, "no_team": 410, "invalid_token": 403}.get(
                    fault.error, 400
                )
                return status, {"Content-Type": "text/html"}, fault.error
        result = self._ok_response(path, params, authorized, has_auth)
        if fault is not None and fault.kind == "post_then_slow":
            # Slack took the message but the answer never arrives in time
            time.sleep(fault.delay_s)
        return result

    def _ok_response(
        self, path: str, params: dict[str, Any], authorized: bool, has_auth: bool
    ) -> tuple[int, dict[str, str], str | bytes | None]:
        if path.startswith("/services/"):
            if path in self.revoked_webhooks:
                return 404, {"Content-Type": "text/html"}, "no_service"
            if path not in self.webhook_paths:
                return 404, {"Content-Type": "text/html"}, "no_service"
            if not params.get("text") and not params.get("blocks"):
                return 400, {"Content-Type": "text/html"}, "no_text"
            self._record_post(params, channel="webhook", via="webhook")
            return 200, {"Content-Type": "text/html"}, "ok"
        if not authorized:
            error = "invalid_auth" if has_auth else "not_authed"
            return 200, _json_ct(), json.dumps({"ok": False, "error": error})
        method = path.rsplit("/", 1)[-1]
        if method == "auth.test":
            return (
                200,
                _json_ct(),
                json.dumps({"ok": True, "team": "T", "user": "triage-bot", "user_id": "U0BOT"}),
            )
        if method == "chat.postMessage":
            channel = self.channels.get(str(params.get("channel")))
            if channel is None:
                return 200, _json_ct(), json.dumps({"ok": False, "error": "channel_not_found"})
            if channel in self.not_member:
                return 200, _json_ct(), json.dumps({"ok": False, "error": "not_in_channel"})
            posted = self._record_post(params, channel=channel, via="api")
            return (
                200,
                _json_ct(),
                json.dumps(
                    {
                        "ok": True,
                        "channel": channel,
                        "ts": posted.ts,
                        "message": {"text": posted.text},
                    }
                ),
            )
        if method == "conversations.history":
            channel_arg = str(params.get("channel"))
            if channel_arg not in self.channels.values():
                # like Slack: history needs the id, a #name is not found
                return 200, _json_ct(), json.dumps({"ok": False, "error": "channel_not_found"})
            oldest = float(params.get("oldest") or 0)
            with_meta = str(params.get("include_all_metadata")) in ("1", "true", "True")
            with self._lock:
                msgs = [
                    p for p in self.posted if p.channel == channel_arg and float(p.ts) >= oldest
                ]
            out = []
            for p in reversed(msgs):  # newest first, as Slack returns them
                m: dict[str, Any] = {"type": "message", "ts": p.ts, "text": p.text}
                if with_meta and p.metadata:
                    m["metadata"] = p.metadata
                out.append(m)
            return 200, _json_ct(), json.dumps({"ok": True, "messages": out, "has_more": False})
        return 200, _json_ct(), json.dumps({"ok": False, "error": "unknown_method"})

    def _record_post(self, params: dict[str, Any], *, channel: str, via: str) -> Posted:
        blocks = params.get("blocks") or []
        if isinstance(blocks, str):
            blocks = json.loads(blocks)
        metadata = params.get("metadata")
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        with self._lock:
            self._seq += 1
            # real ts values are epoch seconds; ours start "now" so history's oldest works
            ts = f"{int(time.time()) + self._seq}.{self._seq:06d}"
            posted = Posted(
                ts=ts,
                channel=channel,
                text=str(params.get("text") or ""),
                blocks=list(blocks),
                thread_ts=params.get("thread_ts"),
                metadata=metadata,
                via=via,
                at=self.clock(),
            )
            self.posted.append(posted)
        return posted


def _json_ct() -> dict[str, str]:
    return {"Content-Type": "application/json; charset=utf-8"}
