"""`uc chat PACK-or-URL`: an interactive chat in the terminal, streamed token by token.

Given a URL it talks to that server; given a pack folder it first starts a private server for it on a
free local port (the same server `uc serve` runs) and stops it on exit. Commands: /reset clears the
conversation, /exit (or Ctrl-D) quits.
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path
from typing import TextIO

from .client import APIError, Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`uc serve PACK` in a background thread of this process, on 127.0.0.1."""

    def __init__(self, pack: str, **engine) -> None:
        import uvicorn

        from server.app import AppState, build_app
        from server.config import EngineConfig, ServerConfig
        from server.loader import check_pack

        check_pack(pack)  # a bad pack is refused here in one line, as by `uc serve`, not after the server starts
        self.cfg = ServerConfig(pack=pack, port=free_port(), log_level="warning", engine=EngineConfig(**engine))
        self.state = AppState(self.cfg)
        app = build_app(self.cfg, state=self.state)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.cfg.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uc-chat-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.port}"

    def __enter__(self) -> "LocalServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def repl(client: Client, system: str | None, params: dict, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            stdout.write("\n")
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if system else []
            stdout.write("(conversation cleared)\n")
            continue
        history.append({"role": "user", "content": line})
        stdout.write("assistant> ")
        reply = []
        try:
            for d in client.stream_chat(history, **params):
                reply.append(d.text)
                stdout.write(d.text)
                stdout.flush()
        except APIError as exc:
            stdout.write(f"\n[error {exc.status}: {exc.message}]\n")
            history.pop()
            continue
        stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def run_chat(target: str, api_key: str | None, system: str | None, params: dict, engine: dict) -> int:
    if target.startswith(("http://", "https://")):
        with Client(target, api_key=api_key) as client:
            client.wait_ready(60)
            return repl(client, system, params)
    if not (Path(target) / "manifest.json").is_file():
        raise ValueError(f"{target}: neither an http(s) URL nor a uc pack folder")
    with LocalServer(target, **engine) as local, Client(local.url) as client:
        sys.stderr.write(f"loading {target} ...\n")
        client.wait_ready(600)
        if local.state.load_error:
            raise ValueError(f"{target}: {local.state.load_error}")
        return repl(client, system, params)
