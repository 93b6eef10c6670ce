"""Debian's nginx as a child process, configured from the block in docs/deploy.md."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

DEPLOY_DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
_BLOCK = re.compile(r"^```nginx\n(.*?)^```", re.S | re.M)


def nginx_binary() -> str:
    """The nginx to run: `TOKENRELAY_NGINX`, else the distribution's; missing is a failure."""
    found = os.environ.get("TOKENRELAY_NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"
    assert os.access(found, os.X_OK), (
        f"nginx not found at {found}: run scripts/install-system-deps (apt-get install nginx)"
    )
    return found


def documented_config() -> str:
    """The one nginx block of docs/deploy.md, as operators copy it."""
    blocks = _BLOCK.findall(DEPLOY_DOC.read_text(encoding="utf-8"))
    assert len(blocks) == 1, "docs/deploy.md should hold exactly one ```nginx block"
    return str(blocks[0])


def substitute(config: str, old: str, new: str) -> str:
    """Replace one line's setting; the documented config must contain it exactly once."""
    assert config.count(old) == 1, f"docs/deploy.md's nginx block no longer has {old!r}"
    return config.replace(old, new)


@contextlib.contextmanager
def running_nginx(http_block: str, port: int) -> Iterator[list[str]]:
    """Run nginx in the foreground with `http_block` in its http context; yields its log lines.

    Everything it writes (pid, temp files) stays in a directory of its own; it is stopped
    (SIGQUIT, then SIGKILL to its process group) and the directory removed at the end.
    """
    with tempfile.TemporaryDirectory(prefix="tokenrelay-nginx-") as tmp:
        os.chmod(tmp, 0o755)  # workers may run as another user when started as root
        temp_paths = ""
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            path = Path(tmp) / name
            path.mkdir(mode=0o777)
            path.chmod(0o777)
            temp_paths += f"    {name}_temp_path {path};\n"
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(
            "daemon off;\nworker_processes 1;\n"
            f"pid {tmp}/nginx.pid;\nerror_log stderr info;\n"
            "events { worker_connections 512; }\n"
            f"http {{\n    access_log off;\n{temp_paths}{http_block}\n}}\n"
        )
        proc = subprocess.Popen(
            [nginx_binary(), "-p", tmp, "-c", str(conf), "-e", "stderr"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its workers share its process group, stopped together
        )
        assert proc.stderr is not None
        stderr = proc.stderr
        lines: list[str] = []
        reader = threading.Thread(
            target=lambda: lines.extend(iter(lambda: stderr.readline().decode(), "")),
            daemon=True,
        )
        reader.start()
        try:
            deadline = time.monotonic() + 20
            while True:
                assert proc.poll() is None, "nginx exited:\n" + "".join(lines)
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=1),
                ):
                    break
                assert time.monotonic() < deadline, "nginx did not listen:\n" + "".join(lines)
                time.sleep(0.05)
            yield lines
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGQUIT)  # graceful: workers finish and exit
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group is nginx's own
            proc.wait()
            reader.join(timeout=5)
            stderr.close()
