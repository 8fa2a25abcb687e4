"""The admin API's OpenAPI 3.1 document, served at /admin/openapi.json."""

from __future__ import annotations

from typing import Any

from proxy import __version__
from proxy.auth.tokens import MAX_QUOTA


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": _json(_ref("Error"), "Bad input; nothing changed"),
    "401": _json(_ref("Error"), "Missing or wrong admin token"),
    "403": _json(_ref("Error"), "Admin API disabled (no admin token configured)"),
}
_NOT_FOUND = {"404": _json(_ref("Error"), "Unknown token id")}
_TOKEN_ID = {"name": "token_id", "in": "path", "required": True, "schema": {"type": "string"}}

_CLASS = {
    "type": ["string", "null"],
    "description": "Class of service (config `classes`); null: the config's default_class",
}
_QUOTA = {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_QUOTA}
_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}, "reason": {"type": "string"}},
    },
    "Token": {
        "type": "object",
        "description": "A token as the store keeps it: never its secret or hash.",
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "scopes": {"type": "array", "items": {"type": "string"}},
            "upstream_key": {"type": "string"},
            "hourly": _QUOTA,
            "per_minute": _QUOTA,
            "weight": {"type": "integer", "minimum": 1},
            "class": _CLASS,
            "created_at": {"type": "string", "format": "date-time"},
            "expires_at": {"type": ["string", "null"], "format": "date-time"},
            "revoked_at": {"type": ["string", "null"], "format": "date-time"},
            "status": {"enum": ["active", "expired", "revoked"]},
        },
    },
    "NewToken": {
        "allOf": [
            _ref("Token"),
            {
                "type": "object",
                "properties": {"token": {"type": "string", "description": "Shown once"}},
            },
        ]
    },
    "TokenCreate": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "scopes"],
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
            "scopes": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "upstream_key": {"type": "string", "default": "default"},
            "hourly": _QUOTA,
            "per_minute": _QUOTA,
            "weight": {"type": "integer", "minimum": 1, "default": 1},
            "expires_in": {"type": ["string", "null"], "examples": ["30d", "12h"]},
            "class": _CLASS,
        },
    },
    "TokenUpdate": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {
            "scopes": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "hourly": _QUOTA,
            "per_minute": _QUOTA,
            "weight": {"type": "integer", "minimum": 1},
            "expires_in": {"type": ["string", "null"], "description": "null: never expires"},
            "class": _CLASS,
        },
    },
    "Window": {
        "type": "object",
        "properties": {
            "requests": {"type": "integer"},
            "per_seconds": {"type": "number"},
            "used": {"type": "integer"},
            "remaining": {"type": "integer"},
            "reset_in": {"type": "number", "description": "seconds"},
            "external": {"type": "integer", "description": "used by others (echowin says)"},
        },
    },
    "Usage": {
        "type": "object",
        "properties": {
            "token": _ref("Token"),
            "answered": {
                "type": "object",
                "description": "Answers by HTTP status on this replica since it started",
                "additionalProperties": {"type": "integer"},
            },
            "quota": {"type": ["array", "null"], "items": _ref("Window")},
        },
    },
}


def openapi_document() -> dict[str, Any]:
    """The document; built per call (it is small and served rarely)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "echowin-gateway admin API", "version": __version__},
        "security": [{"adminToken": []}],
        "paths": {**_token_paths(), **_other_paths()},
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
        },
    }


def _token_paths() -> dict[str, Any]:
    """The token collection and one token: list, create, show, change, revoke."""
    return {
        "/admin/tokens": {
            "get": {
                "summary": "List tokens",
                "responses": {
                    "200": _json(
                        {"type": "object", "properties": {"tokens": {"items": _ref("Token")}}},
                        "Every token, oldest first",
                    ),
                    **_ERRORS,
                },
            },
            "post": {
                "summary": "Create a token (its secret is in this answer only)",
                "requestBody": _json(_ref("TokenCreate"), "The new token") | {"required": True},
                "responses": {"201": _json(_ref("NewToken"), "Created"), **_ERRORS},
            },
        },
        "/admin/tokens/{token_id}": {
            "parameters": [_TOKEN_ID],
            "get": {
                "summary": "Show a token",
                "responses": {"200": _json(_ref("Token"), "The token"), **_ERRORS, **_NOT_FOUND},
            },
            "patch": {
                "summary": "Change quotas, weight, scopes or expiry",
                "requestBody": _json(_ref("TokenUpdate"), "Fields to change") | {"required": True},
                "responses": {"200": _json(_ref("Token"), "Updated"), **_ERRORS, **_NOT_FOUND},
            },
            "delete": {
                "summary": "Revoke a token (at once on this replica)",
                "responses": {"200": _json(_ref("Token"), "Revoked"), **_ERRORS, **_NOT_FOUND},
            },
        },
    }


def _other_paths() -> dict[str, Any]:
    """A token's usage, the workers' forget call, and the budget."""
    return {
        "/admin/tokens/{token_id}/usage": {
            "parameters": [_TOKEN_ID],
            "get": {
                "summary": "What a token has used",
                "responses": {"200": _json(_ref("Usage"), "Usage"), **_ERRORS, **_NOT_FOUND},
            },
        },
        "/admin/tokens/{token_id}/forget": {
            "parameters": [_TOKEN_ID],
            "post": {
                "summary": "Drop this process's cached copy of a token (serve --workers uses"
                " it to make a revocation or change take effect on every worker at once)",
                "responses": {"200": _json({"type": "object"}, "Forgotten"), **_ERRORS},
            },
        },
        "/admin/budget": {
            "get": {
                "summary": "Every upstream credential's budget windows, queue and freeze",
                "responses": {"200": _json({"type": "object"}, "Budget state"), **_ERRORS},
            }
        },
    }
