"""Settings: one frozen Struct tree read once from a TOML file and the environment.

Sources, later ones winning: built-in defaults, the TOML file (`--config` or
`TOKENRELAY_CONFIG`), then `TOKENRELAY_<TABLE>__<KEY>` variables (a value is read as a TOML
literal when it parses as one, else as a string: `TOKENRELAY_SERVER__SSE_HEARTBEAT=5`,
`TOKENRELAY_DEMO=false`). Without `[[providers]]`, `OPENAI_API_KEY` and `ANTHROPIC_API_KEY`
each add a provider. API keys are only ever named here (`api_key_env`), never stored.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

from providers.settings import ProviderSettings
from server.logs import log_config

ENV_PREFIX = "TOKENRELAY_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ADDRESS = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


class ServerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `[server]` table."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 4 * 1024 * 1024
    sse_heartbeat: float = 15.0
    slow_consumer_timeout: float = 30.0
    retry_budget: float = 30.0
    shutdown_grace: float = 20.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 10_000
    # Streams this process runs at once, every transport and dialect together; past it a new
    # stream is refused at once (503, Retry-After). 0: no cap. Sized in loadtests/README.md.
    max_streams: int = 256
    # Peers whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses or networks, or
    # "*"); by default nobody's, so the client address is always the connection's.
    forwarded_allow_ips: list[str] = msgspec.field(default_factory=list)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    log_content: bool = False


class WebSocketSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `[websocket]` table."""

    max_streams: int = 8
    max_frame_bytes: int = 1024 * 1024
    max_fragments: int = 16
    ping_interval: float = 20.0
    ping_timeout: float = 20.0


class CacheSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `[cache]` table: in memory unless `url` names a Redis server."""

    url: str | None = None
    completions: bool = False
    scope: Literal["key", "global"] = "key"  # whose cached answers a request may get
    ttl: float = 3600.0
    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    timeout: float = 0.1
    namespace: str = "tokenrelay"


class ResponsesSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `[responses]` table: how long stored Responses API answers are kept, and (in memory,
    without a `[cache] url`) how many of them and how many bytes at most."""

    ttl: float = 30 * 86_400.0
    max_entries: int = 10_000
    max_bytes: int = 256 * 1024 * 1024


class StreamSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `[streams]` table: resumable streams and their journal (in Redis with `[cache] url`)."""

    resume_grace: float = 30.0  # a dropped resumable stream goes on this long without a reader
    journal_ttl: float = 60.0  # an ended stream stays readable this long
    journal_max_events: int = 20_000  # per stream; the oldest go first
    journal_max_bytes: int = 4 * 1024 * 1024  # per stream
    memory_bytes: int = 256 * 1024 * 1024  # every journal this process holds in memory


class CatalogSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `[catalog]` table: how long a fetched model list is served before it is refreshed."""

    ttl: float = 300.0
    retry: float = 15.0  # after a provider or the classifier failed, try again this soon
    keep_stale: float = 86_400.0  # how long a list or classification stays to fall back on


class ClassifierSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `[classifier]` table: no `address` runs the rules in-process."""

    address: str | None = None
    deadline: float = 2.0


class AuthSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `[auth]` table: gateway keys (as SHA-256 hex digests) and allowed browser origins."""

    keys: list[str] = msgspec.field(default_factory=list)
    origins: list[str] = msgspec.field(default_factory=list)


class LimitSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `[limits]` table; a rate of 0 means unlimited."""

    max_messages: int = 512
    max_chars: int = 1_000_000
    max_tokens: int = 65_536
    max_json_depth: int = 32
    max_header_bytes: int = 16 * 1024
    ws_frames_per_second: int = 50
    ws_sockets_per_key: int = 16
    streams_per_key: int = 64
    # Without `[auth] keys` each client address is a principal; its caps are off (0) unless set,
    # as one address is often one backend or the proxy in front of the gateway.
    ws_sockets_per_address: int = 0
    streams_per_address: int = 0
    lease_ttl: float = 30.0  # with Redis: a dead replica's stream and socket slots free after this
    requests_per_minute: int = 0
    tokens_per_minute: int = 0


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole configuration."""

    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    websocket: WebSocketSettings = msgspec.field(default_factory=WebSocketSettings)
    cache: CacheSettings = msgspec.field(default_factory=CacheSettings)
    responses: ResponsesSettings = msgspec.field(default_factory=ResponsesSettings)
    streams: StreamSettings = msgspec.field(default_factory=StreamSettings)
    fallbacks: dict[str, list[str]] = msgspec.field(default_factory=dict)
    catalog: CatalogSettings = msgspec.field(default_factory=CatalogSettings)
    classifier: ClassifierSettings = msgspec.field(default_factory=ClassifierSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    limits: LimitSettings = msgspec.field(default_factory=LimitSettings)
    providers: list[ProviderSettings] = msgspec.field(default_factory=list)
    demo: bool = True


class SettingsError(Exception):
    """Every problem found in the configuration, each prefixed with its path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load(path: str | Path | None, environ: Mapping[str, str]) -> Settings:
    """Read, merge and validate the settings; `SettingsError` lists every problem."""
    problems: list[str] = []
    data: dict[str, Any] = {}
    path = path or environ.get(ENV_PREFIX + "CONFIG") or None
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError([f"{path}: cannot read ({exc.strerror})"]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError([f"{path}: not valid TOML ({exc})"]) from exc
    from_environment = _apply_environment(data, environ, problems)
    if "providers" not in data:
        data["providers"] = _providers_from_keys(environ)
    if data.get("demo", True) is True and isinstance(data["providers"], list):
        if not any(isinstance(p, dict) and p.get("name") == "demo" for p in data["providers"]):
            data["providers"].append({"name": "demo", "kind": "demo"})
    settings = _Validator(environ, problems).convert(data, Settings, "")
    if problems or settings is _INVALID:
        raise SettingsError([_source(p, from_environment) for p in sorted(problems, key=_section)])
    assert isinstance(settings, Settings)
    return settings


def _providers_from_keys(environ: Mapping[str, str]) -> list[dict[str, Any]]:
    found = []
    if environ.get("OPENAI_API_KEY"):
        found.append({"name": "openai", "kind": "openai", "api_key_env": "OPENAI_API_KEY"})
    if environ.get("ANTHROPIC_API_KEY"):
        found.append({"name": "anthropic", "kind": "anthropic", "api_key_env": "ANTHROPIC_API_KEY"})
    return found


def _apply_environment(
    data: dict[str, Any], environ: Mapping[str, str], problems: list[str]
) -> dict[str, str]:
    """Merge `TOKENRELAY_<TABLE>__<KEY>` variables into `data`; returns path -> variable."""
    applied: dict[str, str] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        keys = name[len(ENV_PREFIX) :].lower().split("__")
        target = data
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                problems.append(f"{name}: {'.'.join(keys)} is not a table")
                break
        else:
            target[keys[-1]] = _literal(raw)
            applied[".".join(keys)] = name
    return applied


def _source(problem: str, from_environment: dict[str, str]) -> str:
    """A problem with a value from the environment names the variable to look at."""
    path = problem.partition(": ")[0]
    name = from_environment.get(path)
    return f"{problem} (from {name})" if name else problem


def _literal(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


_INVALID: Any = object()  # what a value with a problem converts to
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_AT = re.compile(r" - at `\$(.*)`$")

# Numbers must be positive, except these (by name, or by path), where zero means none or
# unlimited.
_ZERO_ALLOWED = {
    "pace",
    "retries",
    "requests_per_minute",
    "tokens_per_minute",
    "streams_per_address",
    "ws_sockets_per_address",
    "server.max_streams",
}


class _Validator:
    """One pass over the raw settings: every field is converted and checked on its own.

    A value with a problem never hides another: types, ranges, the rules that relate fields
    and the environment variables the settings name are all checked in the same walk, on
    whichever neighbours did convert.
    """

    def __init__(self, environ: Mapping[str, str], problems: list[str]) -> None:
        self.environ = environ
        self.problems = problems

    def convert(self, value: Any, annotation: Any, path: str) -> Any:
        if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
            return self._struct(value, annotation, path)
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is list and args and _is_struct(args[0]):
            if not isinstance(value, list):
                return self.report(path, "expected an array of tables")
            items = [self.convert(item, args[0], f"{path}[{i}]") for i, item in enumerate(value)]
            return _INVALID if _INVALID in items else items
        if origin is dict and args and isinstance(value, dict):
            pairs = {k: self.convert(v, args[1], _join(path, k)) for k, v in value.items()}
            return _INVALID if _INVALID in pairs.values() else pairs
        try:
            converted = msgspec.convert(value, annotation)
        except msgspec.ValidationError as exc:
            return self.report(*_plain(exc, annotation, value, path))
        problem = _range(path, converted, annotation)
        return self.report(path, problem) if problem else converted

    def _struct(self, value: Any, annotation: type[msgspec.Struct], path: str) -> Any:
        if not isinstance(value, dict):
            return self.report(path or "config", "expected a table")
        fields = {f.name: f for f in msgspec.structs.fields(annotation)}
        before = len(self.problems)
        for key in value:
            if key not in fields:
                self.report(_join(path, key), "unknown setting" + _did_you_mean(key, fields))
        converted: dict[str, Any] = {}
        for name, field in fields.items():
            if name in value:
                item = self.convert(value[name], field.type, _join(path, name))
                if item is not _INVALID:
                    converted[name] = item
            elif field.required:
                self.report(_join(path, name), "required")
            else:
                converted[name] = (
                    field.default_factory() if field.default is msgspec.NODEFAULT else field.default
                )
        rule = _RULES.get(annotation)
        if rule is not None:
            rule(self, path, converted, value)
        if len(self.problems) > before:
            return _INVALID
        return annotation(**converted)

    def report(self, path: str, problem: str) -> Any:
        self.problems.append(f"{path}: {problem}")
        return _INVALID


_SECTIONS = {f.name: i for i, f in enumerate(msgspec.structs.fields(Settings))}
_HEAD = re.compile(r"^([^.\[:]*)(?:\[(\d+)\])?")


def _section(problem: str) -> tuple[int, int]:
    """Problems grouped by table (in the order of `Settings`) and by array item."""
    head = _HEAD.match(problem)
    assert head is not None
    return _SECTIONS.get(head.group(1), -1), int(head.group(2) or -1)


def _is_struct(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, msgspec.Struct)


def _did_you_mean(given: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(given, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _plain(exc: msgspec.ValidationError, annotation: Any, value: Any, path: str) -> tuple[str, str]:
    """The path and text of a msgspec problem, in the words of a settings file."""
    text = str(exc)
    found = _AT.search(text)
    if found:
        path, text = path + found.group(1), text[: found.start()]
    if typing.get_origin(annotation) is Literal:
        choices = [str(a) for a in typing.get_args(annotation)]
        text = f"expected one of {', '.join(repr(c) for c in choices)}"
        if isinstance(value, str):
            text += _did_you_mean(value, choices)
    return path, text.replace("`", "")


def _range(path: str, value: Any, annotation: Any) -> str | None:
    """The range every number in the settings keeps to, from its name and type."""
    if annotation not in (int, float) or isinstance(value, bool):
        return None
    name = path.rpartition(".")[2]
    if name == "port":
        return None if 0 < value < 65536 else "expected 1-65535"
    unit = "seconds" if annotation is float else "bytes" if "bytes" in name else ""
    if name in _ZERO_ALLOWED or path in _ZERO_ALLOWED:
        return None if value >= 0 else f"expected zero or more {unit}".rstrip()
    return None if value > 0 else f"expected a positive number of {unit}".removesuffix(" of ")


def _join(path: str, key: str) -> str:
    key = key if _BARE_KEY.match(key) else '"' + key.replace('"', '\\"') + '"'
    return f"{path}.{key}" if path else key


Rule = typing.Callable[[_Validator, str, dict[str, Any], dict[str, Any]], None]


def _cache_rules(v: _Validator, path: str, fields: dict[str, Any], raw: dict[str, Any]) -> None:
    url = fields.get("url")
    if url is not None and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        v.report(_join(path, "url"), "expected a redis://, rediss:// or unix:// URL")


def _catalog_rules(v: _Validator, path: str, fields: dict[str, Any], raw: dict[str, Any]) -> None:
    ttl, keep_stale = fields.get("ttl"), fields.get("keep_stale")
    if ttl is not None and keep_stale is not None and 0 < keep_stale < ttl:
        v.report(_join(path, "keep_stale"), "expected at least catalog.ttl")


def _classifier_rules(
    v: _Validator, path: str, fields: dict[str, Any], raw: dict[str, Any]
) -> None:
    address = fields.get("address")
    if address is not None:
        found = _ADDRESS.match(address)
        if found is None or not 0 < int(found.group(1)) < 65536:
            v.report(_join(path, "address"), "expected host:port, e.g. 127.0.0.1:50051")


def _stream_rules(v: _Validator, path: str, fields: dict[str, Any], raw: dict[str, Any]) -> None:
    events, size = fields.get("journal_max_bytes"), fields.get("memory_bytes")
    if events is not None and size is not None and size < events:
        v.report(_join(path, "memory_bytes"), "expected at least streams.journal_max_bytes")


def _server_rules(v: _Validator, path: str, fields: dict[str, Any], raw: dict[str, Any]) -> None:
    for i, entry in enumerate(fields.get("forwarded_allow_ips", ())):
        if entry != "*" and not _is_network(entry):
            v.report(
                f"{_join(path, 'forwarded_allow_ips')}[{i}]",
                "expected an IP address or network, or '*'",
            )


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def _auth_rules(v: _Validator, path: str, fields: dict[str, Any], raw: dict[str, Any]) -> None:
    for i, digest in enumerate(fields.get("keys", ())):
        if not _DIGEST.match(digest):
            v.report(
                f"{_join(path, 'keys')}[{i}]",
                "expected a SHA-256 hex digest (see `tokenrelay create-key`)",
            )
    for i, origin in enumerate(fields.get("origins", ())):
        url = urlsplit(origin)
        exact = f"{url.scheme}://{url.netloc}" == origin and not url.username
        if url.scheme not in ("http", "https") or not url.hostname or not exact:
            v.report(
                f"{_join(path, 'origins')}[{i}]",
                "expected scheme://host[:port], e.g. https://chat.example.com",
            )


def _provider_rules(v: _Validator, path: str, fields: dict[str, Any], raw: dict[str, Any]) -> None:
    name, kind = fields.get("name"), fields.get("kind")
    if name is not None and not _NAME.match(name):
        v.report(f"{path}.name", "expected letters, digits, '_', '.' or '-'")
    base_url = fields.get("base_url")
    if base_url is not None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            v.report(f"{path}.base_url", "expected an http(s) URL")
        elif kind == "demo":
            v.report(f"{path}.base_url", "the demo provider has no upstream")
    key_env = fields.get("api_key_env")
    if key_env is not None and not v.environ.get(key_env):
        v.report(f"{path}.api_key_env", f"environment variable {key_env} is not set")
    elif "api_key_env" not in raw and kind not in (None, "demo") and "base_url" not in raw:
        v.report(f"{path}.api_key_env", f"required for a '{kind}' provider without base_url")


def _settings_rules(v: _Validator, path: str, fields: dict[str, Any], raw: dict[str, Any]) -> None:
    providers = raw.get("providers")
    seen: set[str] = set()
    for i, item in enumerate(providers if isinstance(providers, list) else ()):
        given: Any = item.get("name") if isinstance(item, dict) else None
        if isinstance(given, str) and given in seen:
            v.report(f"providers[{i}].name", f"'{given}' is used by another provider")
        elif isinstance(given, str):
            seen.add(given)
    names = seen | ({"demo"} if raw.get("demo", True) is True else set())
    for model, targets in fields.get("fallbacks", {}).items():
        where = _join("fallbacks", model)
        for at, target in [(where, model), *((f"{where}[{j}]", t) for j, t in enumerate(targets))]:
            prefix, slash, rest = target.partition("/")
            if not slash or not rest or prefix not in names:
                v.report(at, "expected 'provider/model' with a configured provider")


_RULES: dict[type[msgspec.Struct], Rule] = {
    ServerSettings: _server_rules,
    CacheSettings: _cache_rules,
    CatalogSettings: _catalog_rules,
    StreamSettings: _stream_rules,
    ClassifierSettings: _classifier_rules,
    AuthSettings: _auth_rules,
    ProviderSettings: _provider_rules,
    Settings: _settings_rules,
}


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn settings that follow from ours (one place for the CLI and the tests)."""
    ws = settings.websocket
    return {
        "loop": "uvloop",
        "http": "server.guard:GuardedHttpToolsProtocol",  # httptools with a header deadline
        # Past this many connections and tasks, uvicorn answers 503 at once instead of queueing.
        "limit_concurrency": settings.server.max_connections,
        # X-Forwarded-For is believed only from the listed proxies (uvicorn's own default
        # would believe it from any loopback peer).
        "proxy_headers": bool(settings.server.forwarded_allow_ips),
        "forwarded_allow_ips": ",".join(settings.server.forwarded_allow_ips) or None,
        "ws": "server.wsguard:MeteredWebSocketProtocol",  # every frame metered
        # One byte over our own limit, so the app sees an oversized frame and closes with 1009
        # itself, while uvicorn still never buffers an unbounded one.
        "ws_max_size": ws.max_frame_bytes + 1,
        "ws_ping_interval": ws.ping_interval,
        "ws_ping_timeout": ws.ping_timeout,
        "log_level": settings.server.log_level,
        "log_config": log_config(settings.server.log_level, settings.server.log_format),
        "access_log": False,
        "server_header": False,
        # The app drains streams itself on SIGTERM before uvicorn's shutdown starts; this is
        # only the time left for connections to take their error frames and close.
        "timeout_graceful_shutdown": 5,
    }
