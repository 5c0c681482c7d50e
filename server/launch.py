"""Run the app under uvicorn, with a graceful drain on SIGTERM: readiness turns 503 at once, running
requests finish (up to --drain-timeout), then the process exits 0. A second signal exits at once."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time

import uvicorn

from ucformat.errors import PackError

from .app import AppState, build_app
from .config import ServerConfig

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState, drain_timeout: float) -> None:
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout

    def handle_exit(self, sig, frame) -> None:
        if sig == signal.SIGTERM and not self.state.draining and not self.should_exit:
            self.state.draining = True
            log.info("SIGTERM: draining (readiness 503; up to %.0f s for running requests)", self.drain_timeout)
            threading.Thread(target=self._drain, name="uc-drain", daemon=True).start()
            return
        super().handle_exit(sig, frame)

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while time.monotonic() < deadline:
            engine = self.state.engine
            if engine is None or engine.num_unfinished() == 0:
                break
            time.sleep(0.05)
        else:
            log.warning("drain timeout: %d sequences still running", self.state.engine.num_unfinished())
        self.should_exit = True


def examples(cfg: ServerConfig) -> str:
    """A curl and an openai SDK command that work as printed against this server."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    base = f"http://{host}:{cfg.port}/v1"
    auth_h = ' -H "Authorization: Bearer $UC_API_KEY"' if cfg.api_key else ""
    key = 'os.environ["UC_API_KEY"]' if cfg.api_key else '"none"'
    body = json.dumps({"model": cfg.model_name, "messages": [{"role": "user", "content": "What is the capital of "
                       "France?"}], "max_tokens": 32})
    py = (f"import os; from openai import OpenAI; c = OpenAI(base_url=\"{base}\", api_key={key}); "
          f"r = c.chat.completions.create(model=\"{cfg.model_name}\", messages=[{{\"role\": \"user\", "
          f"\"content\": \"Name three French cities.\"}}], max_tokens=32); print(r.choices[0].message.content)")
    return (f"\nServing {cfg.model_name} at {base} (Ctrl-C to stop). Try, from another terminal:\n\n"
            f"  curl -s {base}/chat/completions -H 'Content-Type: application/json'{auth_h} -d '{body}'\n\n"
            f"  {sys.executable} -c '{py}'\n")


def serve(cfg: ServerConfig) -> int:
    """Serve until stopped. Returns the process exit status (1 if the model failed to load); a pack found bad
    while loading (a weight file's hash) raises its PackError, which `uc` reports in one line."""
    state = AppState(cfg)
    app = build_app(cfg, state=state)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            timeout_graceful_shutdown=max(cfg.drain_timeout, 1.0), timeout_keep_alive=30)
    server = DrainingServer(config, state, cfg.drain_timeout)

    def failed() -> None:
        server.should_exit = True

    state.on_load_failure = failed
    state.on_ready = lambda: print(examples(cfg), flush=True)
    server.run()
    if isinstance(state.load_exception, PackError):
        raise state.load_exception
    if state.load_error:
        log.error("could not serve %s: %s", cfg.pack, state.load_error)
        return 1
    return 0
