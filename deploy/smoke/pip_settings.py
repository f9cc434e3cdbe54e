"""The host's pip settings, handed to a `docker build` without baking them into the image.

    python3 deploy/smoke/pip_settings.py OUTDIR [--drop KEY ...]

reads this host's effective pip configuration (`pip config list`: config files and PIP_*
variables), writes OUTDIR/pip.conf for the build (passed as the build secret `pip.conf`), and,
when the host's settings point at local directories or files (find-links, a file:// index,
a constraints file), serves them read-only over HTTP on 127.0.0.1 for the build steps (the
build runs with `--network host`; nothing else can reach the server) and rewrites those
settings to the served URLs. The CA bundle the host's pip trusts (`cert`) is the build secret
`pip-ca`; OUTDIR/pip.conf names it as /run/secrets/pip-ca.

--drop KEY leaves a setting out (the GPU build drops find-links: this host's find-links hold
the CPU build of torch, which would win over the CUDA build on the index).

Writes OUTDIR/ready (a JSON object: {"pip_conf", "cert" or null, "port" or null}) once the
files are in place, then serves until it is terminated (only when something is served; it
exits at once otherwise).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

LIST_KEYS = ("find-links", "extra-index-url")
ONE_KEYS = ("index-url", "constraint", "cert", "trusted-host", "default-timeout")


def effective_config() -> dict[str, str]:
    """pip's own merge: files by precedence, then PIP_* variables (`:env:` wins)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    found: dict[str, tuple[int, str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        scope, _, name = key.rpartition(".")
        value = value.strip().strip("'\"")
        rank = 3 if scope == ":env:" else 2 if scope == "global" else 1
        if name and (name not in found or rank >= found[name][0]):
            found[name] = (rank, value)
    return {k: v for k, (_, v) in found.items()}


def local_path(value: str) -> Path | None:
    if value.startswith("file://"):
        return Path(unquote(urlparse(value).path))
    if value.startswith("/"):
        return Path(value)
    return None


def main(outdir: str, drop: list[str]) -> None:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    served = out / "served"
    served.mkdir(exist_ok=True)
    conf = {k: v for k, v in effective_config().items() if k not in drop}
    shares: list[tuple[str, Path]] = []  # (url path, local path)

    def share(path: Path) -> str:
        name = f"{len(shares)}"
        (served / name).unlink(missing_ok=True)
        (served / name).symlink_to(path)
        shares.append((name, path))
        return name

    server = None
    if any(
        local_path(v)
        for k in (*LIST_KEYS, "index-url", "constraint")
        for v in conf.get(k, "").split()
    ):
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0),
            functools.partial(Quiet, directory=str(served)),
        )
    base = f"http://127.0.0.1:{server.server_address[1]}" if server else ""

    lines = ["[global]"]
    for key in (*LIST_KEYS, "index-url", "constraint"):
        values = []
        for v in conf.get(key, "").split():
            p = local_path(v)
            if p is None:
                values.append(v)
            elif p.exists() and key.endswith("index-url"):
                # an index's pages link to their files relatively (../../files/...): serve
                # the folder above it, so those links stay inside what is served
                values.append(f"{base}/{share(p.parent)}/{p.name}/")
            elif p.exists():
                values.append(f"{base}/{share(p)}" + ("/" if p.is_dir() else ""))
        if values:
            lines.append(f"{key} = {' '.join(values)}")
    if conf.get("default-timeout"):
        lines.append(f"timeout = {conf['default-timeout']}")
    cert = conf.get("cert") or os.environ.get("PIP_CERT")
    if cert and Path(cert).is_file():
        lines.append("cert = /run/secrets/pip-ca")
    else:
        cert = None
    (out / "pip.conf").write_text("\n".join(lines) + "\n")
    ready = {
        "pip_conf": str(out / "pip.conf"),
        "cert": cert,
        "port": base.rpartition(":")[2] or None,
    }
    (out / "ready").write_text(json.dumps(ready))
    if server:
        try:
            server.serve_forever()
        finally:
            server.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # a build fetches thousands of pages
        pass


if __name__ == "__main__":
    main(sys.argv[1], [a for a in sys.argv[2:] if a != "--drop"])
