"""API dialects at the edge: one codec per dialect, each decoding its wire request into the one
typed `ChatRequest` and encoding the typed event stream into its own bodies and SSE events.

The Chat Completions wire lives in `server/protocol.py`; the Anthropic Messages API is in
`messages.py` (the request and its mapping), `messages_wire.py` (answers and errors) and
`messages_api.py` (the routes); OpenAI's Responses API in `responses.py`, `responses_wire.py`,
`responses_items.py` (a stored conversation as input items) and `responses_api.py`, with its
conversation state in `server/response_store.py`.
"""
