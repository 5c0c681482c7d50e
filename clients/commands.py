"""`uc chat PACK-or-URL`: interactive chat with a pack (served privately) or a running server."""

from __future__ import annotations

from .client import APIError


def register(sub) -> None:
    s = sub.add_parser("chat", help="chat interactively with a pack or a running server",
                       description="Chat in the terminal, streamed. TARGET is a uc pack folder (a private server "
                       "is started for it) or the URL of a running `uc serve` (or any OpenAI-compatible server).")
    s.add_argument("target", help="pack folder or http(s)://host:port")
    s.add_argument("--api-key", default=None, help="API key of the server (URL targets)")
    s.add_argument("--system", default=None, help="system message")
    s.add_argument("--max-tokens", type=int, default=256, help="most tokens per reply (default 256)")
    s.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7; 0: greedy)")
    s.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    s.add_argument("--seed", type=int, default=None, help="seed for reproducible replies")
    s.add_argument("--device", default="cpu", help="device for a pack target (default cpu)")
    s.set_defaults(fn=cmd_chat)


def cmd_chat(a) -> int:
    from .chat import run_chat

    params = {"max_tokens": a.max_tokens, "temperature": a.temperature, "top_p": a.top_p}
    if a.seed is not None:
        params["seed"] = a.seed
    return run_chat(a.target, a.api_key, a.system, params, {"device": a.device})


ERRORS = (APIError,)
