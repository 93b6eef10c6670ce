"""The OpenAPI 3.1 document of the REST API, built once from the wire types themselves."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from server import protocol
from server.dialects import messages, messages_wire, responses, responses_wire
from server.dialects.messages_api import ModelPage, TokenCount
from server.dialects.responses_api import Deleted
from server.dialects.responses_items import ItemPage
from server.errors import ErrorEnvelope

_ERRORS = {
    "400": "Invalid request, or over a `[limits]` limit (`error.param` names the field)",
    "401": "Missing or invalid gateway key",
    "403": "Origin not allowed",
    "404": "Unknown model or route",
    "413": "Body over `[server] max_body_bytes`",
    "429": "Rate limited, or at a key's concurrent-stream cap (see `Retry-After`)",
    "431": "Headers over `[limits] max_header_bytes`",
    "502": "Upstream failure",
    "503": "Upstream unavailable, or `server_busy`: the process runs `[server] max_streams` "
    "streams (see `Retry-After`)",
    "504": "Upstream timeout",
}


def document() -> dict[str, Any]:
    """The document: paths, the bearer scheme, and every schema the API sends or accepts."""
    _, schemas = msgspec.json.schema_components(
        [
            protocol.ChatCompletionBody,
            protocol.ChatCompletion,
            protocol.ModelList,
            ErrorEnvelope,
            messages.MessagesBody,
            messages.CountTokensBody,
            messages_wire.MessageObject,
            messages_wire.ErrorResponse,
            TokenCount,
            ModelPage,
            responses.ResponsesBody,
            responses_wire.ResponseObject,
            Deleted,
            ItemPage,
            protocol.StreamCancellation,
        ],
        ref_template="#/components/schemas/{name}",
    )

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def json_content(name: str) -> dict[str, Any]:
        return {"application/json": {"schema": ref(name)}}

    stream_id = {"name": "stream_id", "in": "path", "required": True, "schema": {"type": "string"}}
    errors = {
        status: {"description": text, "content": json_content("ErrorEnvelope")}
        for status, text in _ERRORS.items()
    }
    errors["default"] = {"description": "Any other error", "content": json_content("ErrorEnvelope")}
    anthropic_errors = {
        status: {"description": text, "content": json_content("ErrorResponse")}
        for status, text in [*_ERRORS.items(), ("default", "Any other error")]
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tokenrelay",
            "version": "1",
            "description": "OpenAI-compatible (Chat Completions and Responses) and Anthropic "
            "Messages API.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": {
            "/api/chat/completions": {
                "post": {
                    "operationId": "createChatCompletion",
                    "requestBody": {
                        "required": True,
                        "content": json_content("ChatCompletionBody"),
                    },
                    "responses": {
                        "200": {
                            "description": "The answer; a stream of SSE events when `stream`",
                            "content": {
                                **json_content("ChatCompletion"),
                                "text/event-stream": {"schema": {"type": "string"}},
                            },
                        },
                        **errors,
                    },
                }
            },
            "/api/chat/completions/{stream_id}/stream": {
                "parameters": [stream_id],
                "get": {
                    "operationId": "resumeChatCompletionStream",
                    "description": "A resumable stream (`X-Tokenrelay-Resumable: true`) read again "
                    "from after `Last-Event-ID` (or `after`), then followed live to its end. Only "
                    "for the key (or client address) that started it: 404 for anyone else.",
                    "parameters": [
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer"}},
                        {"name": "after", "in": "query", "schema": {"type": "integer"}},
                    ],
                    "responses": {
                        "200": {
                            "description": "The stream's SSE events after the one asked for",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **errors,
                    },
                },
            },
            "/api/chat/completions/{stream_id}/cancel": {
                "parameters": [stream_id],
                "post": {
                    "operationId": "cancelChatCompletionStream",
                    "description": "Stop a resumable stream at once, on whichever replica runs it.",
                    "responses": {
                        "200": {
                            "description": "How the stream ended, with its usage",
                            "content": json_content("StreamCancellation"),
                        },
                        **errors,
                    },
                },
            },
            "/api/responses": {
                "post": {
                    "operationId": "createResponse",
                    "description": "OpenAI's Responses API; `previous_response_id` continues a "
                    "stored conversation.",
                    "requestBody": {"required": True, "content": json_content("ResponsesBody")},
                    "responses": {
                        "200": {
                            "description": "The response; its SSE events when `stream`",
                            "content": {
                                **json_content("ResponseObject"),
                                "text/event-stream": {"schema": {"type": "string"}},
                            },
                        },
                        **errors,
                    },
                }
            },
            "/api/responses/{response_id}": {
                "parameters": [
                    {
                        "name": "response_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "get": {
                    "operationId": "getResponse",
                    "description": "A stored response of the caller's key (404 for another key's).",
                    "responses": {
                        "200": {
                            "description": "The response",
                            "content": json_content("ResponseObject"),
                        },
                        **errors,
                    },
                },
                "delete": {
                    "operationId": "deleteResponse",
                    "responses": {
                        "200": {"description": "Deleted", "content": json_content("Deleted")},
                        **errors,
                    },
                },
            },
            "/api/responses/{response_id}/input_items": {
                "get": {
                    "operationId": "listResponseInputItems",
                    "description": "The conversation that led to a stored response, as items.",
                    "parameters": [
                        {"name": name, "in": where, "required": where == "path", "schema": schema}
                        for name, where, schema in (
                            ("response_id", "path", {"type": "string"}),
                            ("limit", "query", {"type": "integer", "minimum": 1, "maximum": 100}),
                            ("order", "query", {"enum": ["asc", "desc"]}),
                            ("after", "query", {"type": "string"}),
                        )
                    ],
                    "responses": {
                        "200": {"description": "A page", "content": json_content("ItemPage")},
                        **errors,
                    },
                }
            },
            "/api/v1/messages": {
                "post": {
                    "operationId": "createMessage",
                    "description": "Anthropic's Messages API; errors in Anthropic's shape.",
                    "requestBody": {"required": True, "content": json_content("MessagesBody")},
                    "responses": {
                        "200": {
                            "description": "The message; Anthropic's SSE events when `stream`",
                            "content": {
                                **json_content("MessageObject"),
                                "text/event-stream": {"schema": {"type": "string"}},
                            },
                        },
                        **anthropic_errors,
                    },
                }
            },
            "/api/v1/messages/count_tokens": {
                "post": {
                    "operationId": "countMessageTokens",
                    "description": "The gateway's estimate of a Messages request's input tokens.",
                    "requestBody": {"required": True, "content": json_content("CountTokensBody")},
                    "responses": {
                        "200": {"description": "The count", "content": json_content("TokenCount")},
                        **anthropic_errors,
                    },
                }
            },
            "/api/v1/models": {
                "get": {
                    "operationId": "listModelsAnthropic",
                    "description": "The models in Anthropic's paged list shape.",
                    "parameters": [
                        {"name": name, "in": "query", "schema": schema}
                        for name, schema in (
                            ("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                            ("after_id", {"type": "string"}),
                            ("before_id", {"type": "string"}),
                        )
                    ],
                    "responses": {
                        "200": {"description": "A page", "content": json_content("ModelPage")},
                        **anthropic_errors,
                    },
                }
            },
            "/api/models": {
                "get": {
                    "operationId": "listModels",
                    "responses": {
                        "200": {"description": "The models", "content": json_content("ModelList")},
                        **errors,
                    },
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }


_BODY = msgspec.json.encode(document())


async def openapi_endpoint(request: Request) -> Response:
    """`GET /api/openapi.json`."""
    return Response(_BODY, media_type="application/json")
