"""server.settings.load and the `check-config` command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.cli import main
from server.settings import ServerSettings, Settings, SettingsError, load

SECRET = "sk-live-TopSecretValue0123456789"


def write(tmp_path: Path, text: str, name: str = "tokenrelay.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def names_and_kinds(settings: Settings) -> list[tuple[str, str]]:
    return [(p.name, p.kind) for p in settings.providers]


def test_defaults_with_empty_environ() -> None:
    settings = load(None, {})
    assert settings.server == ServerSettings()
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8000
    assert settings.server.sse_heartbeat == 15.0
    assert settings.demo is True
    assert names_and_kinds(settings) == [("demo", "demo")]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"OPENAI_API_KEY": SECRET}, [("openai", "openai"), ("demo", "demo")]),
        ({"ANTHROPIC_API_KEY": SECRET}, [("anthropic", "anthropic"), ("demo", "demo")]),
        (
            {"OPENAI_API_KEY": SECRET, "ANTHROPIC_API_KEY": SECRET},
            [("openai", "openai"), ("anthropic", "anthropic"), ("demo", "demo")],
        ),
        ({"OPENAI_API_KEY": ""}, [("demo", "demo")]),
    ],
)
def test_api_keys_in_environ_add_providers(
    environ: dict[str, str], expected: list[tuple[str, str]]
) -> None:
    settings = load(None, environ)
    assert names_and_kinds(settings) == expected
    for provider in settings.providers:
        if provider.kind != "demo":
            assert provider.api_key_env == f"{provider.name.upper()}_API_KEY"
            assert provider.base_url is None


def test_toml_file_with_providers(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
port = 9000
sse_heartbeat = 7.5
log_level = "debug"

[[providers]]
name = "openai"
kind = "openai"
api_key_env = "MY_OPENAI_KEY"
models = ["gpt-4o", "gpt-4o-mini"]
aliases = { fast = "gpt-4o-mini" }
idle_timeout = 30

[[providers]]
name = "local"
kind = "openai"
base_url = "http://127.0.0.1:11434/v1"

[[providers]]
name = "claude"
kind = "anthropic"
api_key_env = "MY_ANTHROPIC_KEY"
default_max_tokens = 1024
""",
    )
    settings = load(path, {"MY_OPENAI_KEY": SECRET, "MY_ANTHROPIC_KEY": SECRET})
    assert settings.server.port == 9000
    assert settings.server.sse_heartbeat == 7.5
    assert settings.server.log_level == "debug"
    assert names_and_kinds(settings) == [
        ("openai", "openai"),
        ("local", "openai"),
        ("claude", "anthropic"),
        ("demo", "demo"),
    ]
    openai, local, claude, _ = settings.providers
    assert openai.models == ["gpt-4o", "gpt-4o-mini"]
    assert openai.aliases == {"fast": "gpt-4o-mini"}
    assert openai.idle_timeout == 30.0
    assert local.base_url == "http://127.0.0.1:11434/v1"
    assert local.api_key_env is None
    assert claude.default_max_tokens == 1024


def test_providers_table_replaces_keys_from_environ(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[providers]]\nname = "local"\nkind = "openai"\nbase_url = "http://localhost:8080"\n',
    )
    settings = load(path, {"OPENAI_API_KEY": SECRET})
    assert names_and_kinds(settings) == [("local", "openai"), ("demo", "demo")]


def test_demo_false_in_file_removes_demo(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'demo = false\n[[providers]]\nname = "local"\nkind = "openai"\nbase_url = "http://h:1"\n',
    )
    settings = load(path, {})
    assert settings.demo is False
    assert names_and_kinds(settings) == [("local", "openai")]


def test_own_demo_provider_is_not_duplicated(tmp_path: Path) -> None:
    path = write(tmp_path, '[[providers]]\nname = "demo"\nkind = "demo"\npace = 0.5\n')
    settings = load(path, {})
    assert names_and_kinds(settings) == [("demo", "demo")]
    assert settings.providers[0].pace == 0.5


def test_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nsse_heartbeat = 10\nport = 9000\n")
    settings = load(
        path,
        {
            "TOKENRELAY_SERVER__SSE_HEARTBEAT": "5",
            "TOKENRELAY_SERVER__HOST": "0.0.0.0",
            "TOKENRELAY_SERVER__LOG_LEVEL": "warning",
            "TOKENRELAY_WEBSOCKET__MAX_STREAMS": "3",
            "TOKENRELAY_DEMO": "false",
            "OPENAI_API_KEY": SECRET,
        },
    )
    assert settings.server.sse_heartbeat == 5.0
    assert settings.server.host == "0.0.0.0"
    assert settings.server.log_level == "warning"
    assert settings.server.port == 9000
    assert settings.websocket.max_streams == 3
    assert settings.demo is False
    assert names_and_kinds(settings) == [("openai", "openai")]


def test_tokenrelay_demo_false_without_providers_leaves_none() -> None:
    settings = load(None, {"TOKENRELAY_DEMO": "false"})
    assert settings.demo is False
    assert settings.providers == []


def test_tokenrelay_config_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 8123\n")
    settings = load(None, {"TOKENRELAY_CONFIG": str(path)})
    assert settings.server.port == 8123


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"TOKENRELAY_SERVER__PORT": "abc"}, ["server.port: Expected int, got str"]),
        ({"TOKENRELAY_COLOUR": "red"}, ["colour: unknown setting"]),
        ({"TOKENRELAY_SERVER__SSE_HEARTBEAT": "0"}, ["server.sse_heartbeat: expected a positive"]),
        ({"TOKENRELAY_SERVER__PORT": "70000"}, ["server.port: expected 1-65535"]),
        (
            {"TOKENRELAY_SERVER__SLOW_CONSUMER_TIMEOUT": "-1"},
            ["server.slow_consumer_timeout: expected a positive number of seconds"],
        ),
        (
            {"TOKENRELAY_WEBSOCKET__MAX_STREAMS": "0", "TOKENRELAY_WEBSOCKET__PING_TIMEOUT": "0"},
            [
                "websocket.max_streams: expected a positive number",
                "websocket.ping_timeout: expected a positive number",
            ],
        ),
        (
            {"TOKENRELAY_CATALOG__TTL": "600", "TOKENRELAY_CATALOG__KEEP_STALE": "60"},
            ["catalog.keep_stale: expected at least catalog.ttl"],
        ),
        (
            {"TOKENRELAY_SERVER__LOG_LEVEL": "loud"},
            ["server.log_level: expected one of 'debug', 'info', 'warning', 'error'"],
        ),
    ],
)
def test_bad_environment_overrides(environ: dict[str, str], expected: list[str]) -> None:
    with pytest.raises(SettingsError) as info:
        load(None, environ)
    assert len(info.value.problems) == len(expected)
    for problem, start in zip(info.value.problems, expected, strict=True):
        assert problem.startswith(start), problem


SEVERAL_PROBLEMS = """
[server]
port = "eighty"

[[providers]]
name = "a"
kind = "openai"
base_url = "http://127.0.0.1:1"
colour = "red"

[[providers]]
name = "b"
kind = "openai"
base_url = "ftp://x"

[[providers]]
name = "a"
kind = "openai"
base_url = "http://127.0.0.1:2"

[[providers]]
name = "d"
kind = "openai"
api_key_env = "MISSING_KEY"

[[providers]]
name = "e"
kind = "openai"
base_url = "http://127.0.0.1:3"
idle_timeout = -1

[[providers]]
name = "f"
kind = "bogus"
base_url = "http://127.0.0.1:4"
"""

EXPECTED_PROBLEMS = {
    "server.port": "Expected int, got str",
    "providers[0].colour": "unknown setting",
    "providers[1].base_url": "expected an http(s) URL",
    "providers[2].name": "'a' is used by another provider",
    "providers[3].api_key_env": "environment variable MISSING_KEY is not set",
    "providers[4].idle_timeout": "expected a positive number of seconds",
    "providers[5].kind": "expected one of 'openai', 'anthropic', 'demo'",
}


def problems_by_path(problems: list[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for problem in problems:
        path, sep, text = problem.partition(": ")
        assert sep, problem
        assert path not in result, f"two problems for {path}: {problems}"
        result[path] = text
    return result


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """Type problems and rule problems in the same file are all listed together."""
    path = write(tmp_path, SEVERAL_PROBLEMS)
    with pytest.raises(SettingsError) as info:
        load(path, {"OPENAI_API_KEY": SECRET})
    assert problems_by_path(info.value.problems) == EXPECTED_PROBLEMS
    assert str(info.value) == "\n".join(info.value.problems)


def test_rule_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
max_body_bytes = 0

[[providers]]
name = "a"
kind = "openai"
api_key_env = "MISSING_KEY"
connect_timeout = -1
first_token_timeout = 0

[[providers]]
name = "a"
kind = "openai"
base_url = "ftp://x"
max_connections = 0

[[providers]]
name = "bad name!"
kind = "anthropic"

[[providers]]
name = "d"
kind = "demo"
base_url = "http://127.0.0.1:1"
pace = -0.5
""",
    )
    with pytest.raises(SettingsError) as info:
        load(path, {})
    assert info.value.problems == [
        "server.max_body_bytes: expected a positive number of bytes",
        "providers[0].connect_timeout: expected a positive number of seconds",
        "providers[0].first_token_timeout: expected a positive number of seconds",
        "providers[0].api_key_env: environment variable MISSING_KEY is not set",
        "providers[1].max_connections: expected a positive number",
        "providers[1].base_url: expected an http(s) URL",
        "providers[1].name: 'a' is used by another provider",
        "providers[2].name: expected letters, digits, '_', '.' or '-'",
        "providers[2].api_key_env: required for a 'anthropic' provider without base_url",
        "providers[3].pace: expected zero or more seconds",
        "providers[3].base_url: the demo provider has no upstream",
    ]


def test_type_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
demo = "yes"
extra = 1
[server]
port = "eighty"
[[providers]]
kind = "openai"
models = "gpt-4o"
[[providers]]
name = "c"
kind = "bogus"
""",
    )
    with pytest.raises(SettingsError) as info:
        load(path, {})
    assert problems_by_path(info.value.problems) == {
        "extra": "unknown setting",
        "server.port": "Expected int, got str",
        "providers[0].name": "required",
        "providers[0].models": "Expected array | null, got str",
        "providers[0].api_key_env": "required for a 'openai' provider without base_url",
        "providers[1].kind": "expected one of 'openai', 'anthropic', 'demo'",
        "demo": "Expected bool, got str",
    }


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("server = 1\n", {}, ["server: expected a table"]),
        ("providers = 1\n", {}, ["providers: expected an array of tables"]),
        ("providers = [1]\n", {}, ["providers[0]: expected a table"]),
        (
            "",
            {"TOKENRELAY_SERVER": "1", "TOKENRELAY_SERVER__PORT": "2"},
            [
                "TOKENRELAY_SERVER__PORT: server.port is not a table",
                "server: expected a table (from TOKENRELAY_SERVER)",
            ],
        ),
    ],
)
def test_wrong_shapes(
    tmp_path: Path, text: str, environ: dict[str, str], expected: list[str]
) -> None:
    with pytest.raises(SettingsError) as info:
        load(write(tmp_path, text), environ)
    assert info.value.problems == expected


def test_invalid_toml_is_one_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = = 1\n")
    with pytest.raises(SettingsError) as info:
        load(path, {})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}: not valid TOML (")


def test_missing_file_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(SettingsError) as info:
        load(path, {})
    assert info.value.problems == [f"{path}: cannot read (No such file or directory)"]


def test_secret_value_never_shown(tmp_path: Path) -> None:
    environ = {"OPENAI_API_KEY": SECRET, "ANTHROPIC_API_KEY": SECRET}
    settings = load(None, environ)
    assert SECRET not in repr(settings)
    assert SECRET not in repr(settings.providers)
    assert "OPENAI_API_KEY" in repr(settings)

    path = write(
        tmp_path,
        """
[server]
port = "x"
[[providers]]
name = "openai"
kind = "openai"
api_key_env = "OPENAI_API_KEY"
base_url = "ftp://nowhere"
[[providers]]
name = "other"
kind = "openai"
api_key_env = "UNSET_KEY"
""",
    )
    for env in (environ, {**environ, "TOKENRELAY_SERVER__PORT": "8000"}):
        with pytest.raises(SettingsError) as info:
            load(path, env)
        assert info.value.problems
        assert all(SECRET not in problem for problem in info.value.problems)
        assert SECRET not in str(info.value)


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TOKENRELAY_") or name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_environ")
def test_cli_check_config_reports_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
extra = 1
[[providers]]
name = "a"
kind = "openai"
base_url = "ftp://x"
[[providers]]
name = "a"
kind = "openai"
base_url = "http://127.0.0.1:1"
""",
    )
    assert main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "tokenrelay: the configuration has 3 problems:\n"
        "  extra: unknown setting\n"
        "  providers[0].base_url: expected an http(s) URL\n"
        "  providers[1].name: 'a' is used by another provider\n"
    )

    path = write(
        tmp_path,
        """
[[providers]]
name = "a"
kind = "openai"
base_url = "ftp://x"
[[providers]]
name = "a"
kind = "openai"
base_url = "http://127.0.0.1:1"
""",
    )
    assert main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "tokenrelay: the configuration has 2 problems:",
        "  providers[0].base_url: expected an http(s) URL",
        "  providers[1].name: 'a' is used by another provider",
    ]


@pytest.mark.usefixtures("clean_environ")
def test_cli_check_config_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        '[[providers]]\nname = "local"\nkind = "openai"\nbase_url = "http://127.0.0.1:1/v1"\n'
        '[[providers]]\nname = "claude"\nkind = "anthropic"\nbase_url = "http://127.0.0.1:2"\n',
    )
    assert main(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == "configuration OK; providers: local (openai), claude (anthropic), demo (demo)\n"


@pytest.mark.usefixtures("clean_environ")
def test_cli_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "missing.toml"
    assert main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "tokenrelay: the configuration has 1 problem:",
        f"  {path}: cannot read (No such file or directory)",
    ]


ONE_OF_EVERY_KIND = """
[server]
port = 70000
sse_hearbeat = 5
log_level = "debg"
max_body_bytes = 0

[websocket]
ping_interval = -1

[catalog]
ttl = "soon"
keep_stale = 60

[fallbacks]
"openai/gpt-4o" = ["nowhere/x", 3]

[[providers]]
name = "openai"
kind = "openai"
api_key_env = "UNSET_KEY"
idle_timeout = "long"
"""


def test_one_pass_reports_types_ranges_rules_and_environment(tmp_path: Path) -> None:
    """One error of every kind in one file: all of them come back in one report."""
    with pytest.raises(SettingsError) as info:
        load(write(tmp_path, ONE_OF_EVERY_KIND), {})
    assert info.value.problems == [
        "server.sse_hearbeat: unknown setting; did you mean 'sse_heartbeat'?",
        "server.port: expected 1-65535",
        "server.max_body_bytes: expected a positive number of bytes",
        "server.log_level: expected one of 'debug', 'info', 'warning', 'error'; "
        "did you mean 'debug'?",
        "websocket.ping_interval: expected a positive number of seconds",
        'fallbacks."openai/gpt-4o"[1]: Expected str, got int',
        "catalog.ttl: Expected float, got str",
        "providers[0].idle_timeout: Expected float, got str",
        "providers[0].api_key_env: environment variable UNSET_KEY is not set",
    ]


def test_problems_with_values_from_the_environment_name_the_variable() -> None:
    with pytest.raises(SettingsError) as info:
        load(None, {"TOKENRELAY_SERVER__PORT": "abc", "TOKENRELAY_SERVER__SSE_HEARBEAT": "5"})
    assert info.value.problems == [
        "server.sse_hearbeat: unknown setting; did you mean 'sse_heartbeat'? "
        "(from TOKENRELAY_SERVER__SSE_HEARBEAT)",
        "server.port: Expected int, got str (from TOKENRELAY_SERVER__PORT)",
    ]


def test_fallback_paths_name_the_model(tmp_path: Path) -> None:
    path = write(tmp_path, '[fallbacks]\n"openai/gpt-4o" = ["nowhere/x"]\n')
    with pytest.raises(SettingsError) as info:
        load(path, {})
    assert info.value.problems == [
        "fallbacks.\"openai/gpt-4o\": expected 'provider/model' with a configured provider",
        "fallbacks.\"openai/gpt-4o\"[0]: expected 'provider/model' with a configured provider",
    ]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("tokenrelay 0.")


def test_forwarded_allow_ips_are_checked_and_off_by_default(tmp_path: Path) -> None:
    from server.settings import uvicorn_options

    assert uvicorn_options(load(None, {}))["proxy_headers"] is False
    good = write(tmp_path, '[server]\nforwarded_allow_ips = ["127.0.0.0/8", "::1", "*"]\n')
    options = uvicorn_options(load(good, {}))
    assert options["proxy_headers"] is True
    assert options["forwarded_allow_ips"] == "127.0.0.0/8,::1,*"
    bad = write(tmp_path, '[server]\nforwarded_allow_ips = ["proxy.example"]\n', "bad.toml")
    with pytest.raises(SettingsError) as info:
        load(bad, {})
    assert info.value.problems == [
        "server.forwarded_allow_ips[0]: expected an IP address or network, or '*'"
    ]


def test_responses_table(tmp_path: Path) -> None:
    path = write(tmp_path, "[responses]\nttl = 60.0\nmax_entries = 5\n")
    settings = load(path, {})
    assert settings.responses.ttl == 60.0 and settings.responses.max_entries == 5
    bad = write(tmp_path, "[responses]\nttl = 0\nmax_entires = 5\n", "bad.toml")
    with pytest.raises(SettingsError) as caught:
        load(bad, {})
    assert caught.value.problems == [
        "responses.max_entires: unknown setting; did you mean 'max_entries'?",
        "responses.ttl: expected a positive number of seconds",
    ]


def test_max_streams_and_the_per_address_caps(tmp_path: Path) -> None:
    settings = load(None, {})
    assert settings.server.max_streams > 0  # the process is protected by default
    # Without keys a client address has no stream or socket cap unless one is set.
    assert (settings.limits.streams_per_address, settings.limits.ws_sockets_per_address) == (0, 0)
    assert settings.limits.streams_per_key == 64  # keys keep theirs
    path = write(tmp_path, "[server]\nmax_streams = 0\n[limits]\nstreams_per_address = 8\n")
    settings = load(path, {})
    assert (settings.server.max_streams, settings.limits.streams_per_address) == (0, 8)
    bad = write(
        tmp_path,
        '[server]\nmax_streams = -1\n[websocket]\nmax_streams = 0\n[limits]\nstreams_per_address = "x"\n',
        "bad.toml",
    )
    with pytest.raises(SettingsError) as caught:
        load(bad, {})
    assert caught.value.problems == [
        "server.max_streams: expected zero or more",
        "websocket.max_streams: expected a positive number",
        "limits.streams_per_address: Expected int, got str",
    ]
    with pytest.raises(SettingsError) as caught:
        load(None, {"TOKENRELAY_SERVER__MAX_STREAMS": "1.5"})
    assert caught.value.problems == [
        "server.max_streams: Expected int, got float (from TOKENRELAY_SERVER__MAX_STREAMS)"
    ]
