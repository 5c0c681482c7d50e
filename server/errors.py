"""Errors as values in the OpenAI envelope: {"error": {"message", "type", "param", "code"}}.

Every failure the API reports is an `APIError` with its HTTP status; handlers in app.py turn them (and
FastAPI's own validation errors) into the envelope. Each carries the stats reason it counts under.
"""

from __future__ import annotations

from .protocol import ErrorInfo, ErrorResponse


class APIError(Exception):
    status = 500
    type = "internal_error"
    reason = "internal"  # stats.FAILURE_REASONS
    counted = False  # True when the engine already recorded this failure in its stats

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


class BadRequest(APIError):
    status, type, reason = 400, "invalid_request_error", "validation"


class ContextLengthExceeded(BadRequest):
    def __init__(self, prompt_tokens: int, max_tokens: int | None, limit: int, param: str) -> None:
        asked = f"{prompt_tokens} in the prompt" + (f" and {max_tokens} to generate" if max_tokens else "")
        super().__init__(f"This model's maximum context length is {limit} tokens. However, you requested "
                         f"{prompt_tokens + (max_tokens or 0)} tokens ({asked}). Please reduce the length of the "
                         f"prompt or of max_tokens.", param=param, code="context_length_exceeded")


class Unauthorized(APIError):
    status, type, reason = 401, "invalid_request_error", "validation"

    def __init__(self) -> None:
        super().__init__("Incorrect or missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})


class NotFound(APIError):
    status, type, reason = 404, "invalid_request_error", "validation"


class Overloaded(APIError):
    status, type, reason = 429, "rate_limit_error", "overloaded"


class NotReady(APIError):
    status, type, reason = 503, "service_unavailable", "overloaded"


class Timeout(APIError):
    status, type, reason = 408, "timeout_error", "timeout"


class InternalError(APIError):
    pass


class PackUnreadable(InternalError):
    """A forward failed reading the pack (a streamed layer's file altered or gone while serving)."""
    reason = "pack"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="pack_unreadable")


class PackUnusable(NotReady):
    """Since a read failed, the pack's files still fail their check: not ready until they pass again."""
    reason = "pack"

    def __init__(self, pack: str, why: str) -> None:
        super().__init__(f"the pack {pack} can no longer be read: {why}", code="pack_unusable",
                         headers={"Retry-After": "5"})
