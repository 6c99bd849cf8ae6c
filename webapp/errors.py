"""Errors as JSON ``{"error": "..."}`` for the API, so a client always gets a reason; as a page for the pages."""

from __future__ import annotations

from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, InternalServerError, RequestEntityTooLarge


class ApiError(Exception):
    """A request the API refuses: ``status`` is the HTTP status, ``message`` says what was wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> tuple[Response, int]:
    return jsonify(error=message), status


def register_error_handlers(app: Flask) -> None:
    """JSON errors for /api/*, /healthz and /metrics; the pages show an ApiError's message in a page."""

    @app.errorhandler(ApiError)
    def api_error(error: ApiError):
        if not _wants_json():
            return render_template("error.html", status=error.status, message=error.message), error.status
        return error_response(error.status, error.message)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(error: RequestEntityTooLarge):
        limit = app.config["MAX_CONTENT_LENGTH"]
        return error_response(413, f"upload too large: the limit is {limit / (1 << 20):g} MiB")

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        if not _wants_json():
            return error
        return error_response(error.code or 500, error.description or error.name)

    @app.errorhandler(InternalServerError)
    def internal_error(error: InternalServerError):
        if not _wants_json():
            return error
        return error_response(500, "internal server error")


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.path in ("/healthz", "/metrics")
