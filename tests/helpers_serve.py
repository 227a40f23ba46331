"""A real ``dinollama serve`` in this process (uvicorn on a free loopback port), for the server tests."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import uvicorn

from dinollama.serve import ServeConfig, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, **config) -> None:
        self.config = ServeConfig(port=free_port(), **config)
        self.app = create_app(self.config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.config.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.config.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                status, _ = self.get("/health")
                if status == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"the server did not become ready: {self.app.state.server.load_error}")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):
        return self.app.state.server

    def request(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, _parse(r.read(), r.headers)
        except urllib.error.HTTPError as e:
            return e.code, _parse(e.read(), e.headers)

    def get(self, path: str, headers: dict | None = None):
        return self.request("GET", path, headers=headers)

    def post(self, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
        return self.request("POST", path, body, headers, raw)


def _parse(data: bytes, headers):
    if "json" in headers.get("content-type", ""):
        return json.loads(data)
    return data.decode()


def sse_events(url: str, body: dict, headers: dict | None = None) -> list[dict]:
    """The JSON events of a streamed response (``[DONE]`` ends it)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    events = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    events.append("[DONE]")
                    break
                events.append(json.loads(line[6:]))
    return events
