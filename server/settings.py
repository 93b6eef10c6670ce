"""Settings: one frozen Struct tree read once from a TOML file and the environment.

Sources, later ones winning: built-in defaults, the TOML file (`--config` or
`TOKENRELAY_CONFIG`), then `TOKENRELAY_<TABLE>__<KEY>` variables (a value is read as a TOML
literal when it parses as one, else as a string: `TOKENRELAY_SERVER__SSE_HEARTBEAT=5`,
`TOKENRELAY_DEMO=false`). Without `[[providers]]`, `OPENAI_API_KEY` and `ANTHROPIC_API_KEY`
each add a provider. API keys are only ever named here (`api_key_env`), never stored.
"""

from __future__ import annotations

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
    lease_ttl: float = 30.0  # with Redis: a dead replica's stream and socket slots free after this
    requests_per_minute: int = 0
    tokens_per_minute: int = 0


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole configuration."""

    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    websocket: WebSocketSettings = msgspec.field(default_factory=WebSocketSettings)
    cache: CacheSettings = msgspec.field(default_factory=CacheSettings)
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
    _apply_environment(data, environ, problems)
    if "providers" not in data:
        data["providers"] = _providers_from_keys(environ)
    if data.get("demo", True) is True and isinstance(data["providers"], list):
        if not any(isinstance(p, dict) and p.get("name") == "demo" for p in data["providers"]):
            data["providers"].append({"name": "demo", "kind": "demo"})
    settings: Settings | None = _convert(data, Settings, "", problems)
    problems.extend(_check(data, environ))
    if problems or settings is None:
        raise SettingsError(problems)
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
) -> None:
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


def _literal(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _convert(value: Any, annotation: Any, path: str, problems: list[str]) -> Any:
    """Convert like `msgspec.convert`, but keep going after a problem so all are reported."""
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        if not isinstance(value, dict):
            problems.append(f"{path or 'config'}: expected a table")
            return None
        fields = {f.name: f for f in msgspec.structs.fields(annotation)}
        before = len(problems)
        converted: dict[str, Any] = {}
        for key in value:
            if key not in fields:
                problems.append(f"{_join(path, key)}: unknown setting")
        for name, field in fields.items():
            if name in value:
                converted[name] = _convert(value[name], field.type, _join(path, name), problems)
            elif field.required:
                problems.append(f"{_join(path, name)}: required")
        if len(problems) > before:
            return None
        return annotation(**converted)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if (
        origin is list
        and args
        and isinstance(args[0], type)
        and issubclass(args[0], msgspec.Struct)
    ):
        if not isinstance(value, list):
            problems.append(f"{path}: expected an array of tables")
            return None
        items = [_convert(item, args[0], f"{path}[{i}]", problems) for i, item in enumerate(value)]
        return items if all(item is not None for item in items) else None
    try:
        return msgspec.convert(value, annotation)
    except msgspec.ValidationError as exc:
        problems.append(f"{path}: {_plain(exc, annotation)}")
        return None


def _plain(exc: msgspec.ValidationError, annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return f"expected one of {', '.join(repr(a) for a in typing.get_args(annotation))}"
    return str(exc).split(" - at ", 1)[0].replace("`", "")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _part(value: Any, annotation: Any) -> Any:
    """`value` converted, or None when it has type problems (those are reported already)."""
    try:
        return msgspec.convert(value, annotation)
    except msgspec.ValidationError:
        return None


def _check(data: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Rules beyond types (names, URLs, limits, keys present), on every part that converts."""
    problems: list[str] = []
    server = _part(data.get("server", {}), ServerSettings)
    if server is not None:
        if not 0 < server.port < 65536:
            problems.append("server.port: expected 1-65535")
        if server.max_body_bytes <= 0:
            problems.append("server.max_body_bytes: expected a positive number of bytes")
        if server.max_connections <= 0:
            problems.append("server.max_connections: expected a positive number")
        for i, entry in enumerate(server.forwarded_allow_ips):
            if entry != "*" and not _is_network(entry):
                problems.append(
                    f"server.forwarded_allow_ips[{i}]: expected an IP address or network, or '*'"
                )
        for name in (
            "sse_heartbeat",
            "slow_consumer_timeout",
            "retry_budget",
            "shutdown_grace",
            "header_timeout",
            "body_timeout",
        ):
            if getattr(server, name) <= 0:
                problems.append(f"server.{name}: expected a positive number of seconds")
    ws = _part(data.get("websocket", {}), WebSocketSettings)
    if ws is not None:
        for name in (
            "max_streams",
            "max_frame_bytes",
            "max_fragments",
            "ping_interval",
            "ping_timeout",
        ):
            if getattr(ws, name) <= 0:
                problems.append(f"websocket.{name}: expected a positive number")
    cache = _part(data.get("cache", {}), CacheSettings)
    if cache is not None:
        if cache.url is not None and urlsplit(cache.url).scheme not in ("redis", "rediss", "unix"):
            problems.append("cache.url: expected a redis://, rediss:// or unix:// URL")
        for name in ("ttl", "max_entries", "max_bytes", "timeout"):
            if getattr(cache, name) <= 0:
                problems.append(f"cache.{name}: expected a positive number")
    catalog = _part(data.get("catalog", {}), CatalogSettings)
    if catalog is not None:
        for name in ("ttl", "retry", "keep_stale"):
            if getattr(catalog, name) <= 0:
                problems.append(f"catalog.{name}: expected a positive number of seconds")
        if 0 < catalog.keep_stale < catalog.ttl:
            problems.append("catalog.keep_stale: expected at least catalog.ttl")
    classifier = _part(data.get("classifier", {}), ClassifierSettings)
    if classifier is not None:
        if classifier.deadline <= 0:
            problems.append("classifier.deadline: expected a positive number of seconds")
        if classifier.address is not None:
            found = _ADDRESS.match(classifier.address)
            if found is None or not 0 < int(found.group(1)) < 65536:
                problems.append("classifier.address: expected host:port, e.g. 127.0.0.1:50051")
    problems.extend(_check_auth(data.get("auth", {})))
    limits = _part(data.get("limits", {}), LimitSettings)
    if limits is not None:
        for name, value in msgspec.structs.asdict(limits).items():
            if value < 0 or (value == 0 and not name.endswith("_per_minute")):
                problems.append(f"limits.{name}: expected a positive number")
    providers = data.get("providers")
    seen: set[str] = set()
    for i, raw in enumerate(providers if isinstance(providers, list) else ()):
        given: Any = raw.get("name") if isinstance(raw, dict) else None
        if isinstance(given, str) and given in seen:
            problems.append(f"providers[{i}].name: '{given}' is used by another provider")
        elif isinstance(given, str):
            seen.add(given)
        provider = _part(raw, ProviderSettings)
        if provider is not None:
            problems.extend(_check_provider(f"providers[{i}]", provider, environ))
    fallbacks = _part(data.get("fallbacks", {}), dict[str, list[str]])
    if fallbacks is not None:
        names = seen | ({"demo"} if data.get("demo", True) is True else set())
        for model, targets in fallbacks.items():
            for where, target in [
                (model, model),
                *((f"{model}[{j}]", t) for j, t in enumerate(targets)),
            ]:
                prefix, slash, rest = target.partition("/")
                if not slash or not rest or prefix not in names:
                    problems.append(
                        f"fallbacks.{where}: expected 'provider/model' with a configured provider"
                    )
    return problems


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def _check_auth(raw: Any) -> list[str]:
    auth = _part(raw, AuthSettings)
    if auth is None:
        return []
    problems = [
        f"auth.keys[{i}]: expected a SHA-256 hex digest (see `tokenrelay create-key`)"
        for i, digest in enumerate(auth.keys)
        if not _DIGEST.match(digest)
    ]
    for i, origin in enumerate(auth.origins):
        url = urlsplit(origin)
        exact = f"{url.scheme}://{url.netloc}" == origin and not url.username
        if url.scheme not in ("http", "https") or not url.hostname or not exact:
            problems.append(
                f"auth.origins[{i}]: expected scheme://host[:port], e.g. https://chat.example.com"
            )
    return problems


def _check_provider(
    where: str, provider: ProviderSettings, environ: Mapping[str, str]
) -> list[str]:
    problems: list[str] = []
    if not _NAME.match(provider.name):
        problems.append(f"{where}.name: expected letters, digits, '_', '.' or '-'")
    if provider.base_url is not None:
        url = urlsplit(provider.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            problems.append(f"{where}.base_url: expected an http(s) URL")
        elif provider.kind == "demo":
            problems.append(f"{where}.base_url: the demo provider has no upstream")
    for name in ("connect_timeout", "first_token_timeout", "idle_timeout"):
        if getattr(provider, name) <= 0:
            problems.append(f"{where}.{name}: expected a positive number of seconds")
    if provider.pace < 0:
        problems.append(f"{where}.pace: expected zero or more seconds")
    if provider.max_connections <= 0:
        problems.append(f"{where}.max_connections: expected a positive number")
    if provider.retries < 0:
        problems.append(f"{where}.retries: expected zero or more")
    for name in ("retry_backoff", "retry_max_delay"):
        if getattr(provider, name) <= 0:
            problems.append(f"{where}.{name}: expected a positive number of seconds")
    if provider.api_key_env is not None and not environ.get(provider.api_key_env):
        problems.append(
            f"{where}.api_key_env: environment variable {provider.api_key_env} is not set"
        )
    elif provider.api_key_env is None and provider.kind != "demo" and provider.base_url is None:
        problems.append(
            f"{where}.api_key_env: required for a '{provider.kind}' provider without base_url"
        )
    return problems


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
