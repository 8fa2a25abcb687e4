"""The admin API's OpenAPI 3.1 document, served at /admin/openapi.json."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from proxy import __version__
from proxy.auth.routes import RouteTable
from proxy.auth.scopes import known_scopes
from proxy.auth.tokens import MAX_QUOTA

DURATION_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?[smhdwSMHDW]?\s*$"
"""What ``expires_in`` takes (proxy/auth/tokens.py: parse_duration), for generated clients
and fuzzers: 45s, 15m, 12h, 30d, 2w, or seconds; tests/admin check the two agree."""


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": _json(_ref("Error"), "Bad input; nothing changed"),
    "401": _json(_ref("Error"), "Missing or wrong admin token")
    | {"headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}},
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
            "expires_in": {
                "type": ["string", "number", "null"],
                "pattern": DURATION_PATTERN,
                "maxLength": 32,
                "exclusiveMinimum": 0,
                "examples": ["30d", "12h"],
                "description": "a duration (45s, 15m, 12h, 30d, 2w) or seconds",
            },
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
            "expires_in": {
                "type": ["string", "number", "null"],
                "pattern": DURATION_PATTERN,
                "maxLength": 32,
                "exclusiveMinimum": 0,
                "description": "a duration (45s, 15m, 12h, 30d, 2w) or seconds; null: never"
                " expires",
            },
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
    "AuditEntry": {
        "type": "object",
        "description": "One token operation; never a token or its hash.",
        "properties": {
            "seq": {"type": "integer", "description": "the log's own order"},
            "at": {"type": "string", "format": "date-time"},
            "action": {"enum": ["token.create", "token.revoke", "token.update", "token.migrate"]},
            "token_id": {"type": "string"},
            "actor": {"type": ["string", "null"], "description": "X-Gateway-Actor, cli:USER"},
            "address": {"type": ["string", "null"], "description": "the admin client's"},
            "detail": {"type": "object", "description": "the fields set or changed"},
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


def _schemas(routes: RouteTable, key_names: Sequence[str]) -> dict[str, Any]:
    """The schemas, with what this gateway accepts: its scopes and upstream key names."""
    schemas = copy.deepcopy(_SCHEMAS)
    scope = {"type": "string", "enum": sorted(known_scopes(routes.routes))}
    for name in ("TokenCreate", "TokenUpdate"):
        scopes = schemas[name]["properties"]["scopes"]
        scopes["items"] = scope
    create = schemas["TokenCreate"]["properties"]
    create["upstream_key"]["enum"] = list(key_names)
    return schemas


def openapi_document(routes: RouteTable, key_names: Sequence[str]) -> dict[str, Any]:
    """The document for a gateway with ``routes`` (its scopes) and the upstream keys
    ``key_names`` a token may be bound to; built per call (it is small and served rarely)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "echowin-gateway admin API", "version": __version__},
        "security": [{"adminToken": []}],
        "paths": {**_token_paths(), **_other_paths()},
        "components": {
            "schemas": _schemas(routes, key_names),
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
                "responses": {
                    "201": _json(_ref("NewToken"), "Created"),
                    "409": _json(_ref("Error"), "An active token already has this name"),
                    **_ERRORS,
                },
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
        "/admin/audit": _audit_path(),
        "/admin/budget": {
            "get": {
                "summary": "Every upstream credential's budget windows, queue and freeze;"
                " with the response cache on, what it holds and saved (cache)",
                "responses": {"200": _json({"type": "object"}, "Budget state"), **_ERRORS},
            }
        },
        "/admin/cache": {
            "delete": {
                "summary": "Purge the response cache (optionally one credential's copies,"
                " under one path prefix), on every worker and replica",
                "parameters": [
                    {"name": "credential", "in": "query", "schema": {"type": "string"}},
                    {"name": "prefix", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": _json({"type": "object"}, "Copies purged here"), **_ERRORS},
            }
        },
    }


def _audit_path() -> dict[str, Any]:
    """The audit log of token operations."""
    return {
        "get": {
            "summary": "The audit log of token operations, newest first (404 when the"
            " token store keeps none: Redis)",
            "parameters": [
                {"name": "token_id", "in": "query", "schema": {"type": "string"}},
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                },
            ],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {"entries": {"items": _ref("AuditEntry")}},
                    },
                    "Entries, newest first",
                ),
                **_ERRORS,
                "404": _json(_ref("Error"), "The token store keeps no audit log"),
            },
        }
    }
