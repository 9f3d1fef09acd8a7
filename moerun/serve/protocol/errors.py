"""The protocol's errors: ``APIError`` and OpenAI's error body, a pydantic validation error
as the 400 that names the field, strict request parsing, the model-name check.

    req = parse_request(CompletionRequest, body)      # APIError(400) naming the bad field
    JSONResponse(error_body(err), status_code=err.status)
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

class APIError(Exception):
    """An error the server answers with ``status`` and ``error_body(err)``.

    ``type`` is OpenAI's: "invalid_request_error" (400, and 404 for an unknown model, as
    OpenAI sends it), "authentication_error" (401), "server_error" (500),
    "service_unavailable_error" (503). ``param`` names the offending field, ``code`` is
    OpenAI's short code or None."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def __repr__(self):
        return f"APIError({self.status}, {self.message!r}, param={self.param!r})"

    @classmethod
    def bad_request(cls, message: str, param: str | None = None, code: str | None = None) -> APIError:
        return cls(400, message, "invalid_request_error", param, code)

    @classmethod
    def model_not_found(cls, model: str) -> APIError:
        return cls(404, f"The model `{model}` does not exist.", "invalid_request_error", "model", "model_not_found")

    @classmethod
    def unauthorized(cls, message: str = "Invalid or missing API key.") -> APIError:
        return cls(401, message, "authentication_error", None, "invalid_api_key")

    @classmethod
    def server_error(cls, message: str) -> APIError:
        return cls(500, message, "server_error")

    @classmethod
    def unavailable(cls, message: str) -> APIError:
        return cls(503, message, "service_unavailable_error")


def error_body(err: APIError) -> dict:
    """{"error": {"message", "type", "param", "code"}}, OpenAI's error shape."""
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def _param_path(loc: Sequence) -> str | None:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (list, tuple)):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _short(v: Any, n: int = 40) -> str:
    s = json.dumps(v, ensure_ascii=False, default=str) if not isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return s if len(s) <= n else s[: n - 3] + "..."


_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "string_type": "a string", "bool_type": "a boolean", "bool_parsing": "a boolean",
    "list_type": "an array", "tuple_type": "an array", "dict_type": "an object",
    "model_type": "an object", "model_attributes_type": "an object",
}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
           "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}


def validation_error(e: ValidationError) -> APIError:
    """A 400 naming the first bad field (``param``) and what is wrong with it in words. All
    the unknown fields of a request are named together."""
    errors = e.errors(include_url=False)
    unknown = [err for err in errors if err["type"] == "extra_forbidden"]
    if unknown:
        names = [_param_path(err["loc"]) for err in unknown]
        listed = ", ".join(f"'{n}'" for n in names)
        what = "Unknown field" if len(names) == 1 else "Unknown fields"
        return APIError.bad_request(f"{what} {listed}: not supported by this server "
                                    "(unknown fields are rejected, not ignored).", names[0])
    err = errors[0]
    kind, loc, value, ctx = err["type"], err["loc"], err.get("input"), err.get("ctx") or {}
    param = _param_path(loc)
    if kind == "json_invalid":
        return APIError.bad_request(f"The request body is not valid JSON: {ctx.get('error', err['msg'])}.")
    if not loc and kind in ("model_type", "model_attributes_type", "dict_type"):
        return APIError.bad_request(f"The request body must be a JSON object, got {_json_type(value)}.")
    if kind == "missing":
        return APIError.bad_request(f"'{param}' is required.", param)
    if kind in _EXPECTED:
        return APIError.bad_request(f"'{param}' must be {_EXPECTED[kind]}, got {_json_type(value)} "
                                    f"({_short(value)}).", param)
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        return APIError.bad_request(f"'{param}' must be {op} {ctx[key]}, got {_short(value)} (out of range).", param)
    if kind == "too_short":
        return APIError.bad_request(f"'{param}' must not be empty." if ctx.get("min_length") == 1 else
                                    f"'{param}' needs at least {ctx.get('min_length')} items.", param)
    if kind == "literal_error":
        return APIError.bad_request(f"'{param}' must be {ctx.get('expected')}, got {_short(value)}.", param)
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return APIError.bad_request(f"'{param}': {msg}" if param else msg, param)


def parse_request(cls: type[BaseModel], body: bytes | bytearray | str | dict):
    """``cls`` validated from a raw JSON body (or an already decoded dict); APIError(400) if bad."""
    try:
        if isinstance(body, (bytes, bytearray, str)):
            return cls.model_validate_json(body)
        return cls.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


def check_model(requested: str | None, served: str | Iterable[str]) -> None:
    """404 when the request names a model this server does not serve (None: the served one)."""
    names = {served} if isinstance(served, str) else set(served)
    if requested is not None and requested not in names:
        raise APIError.model_not_found(requested)
