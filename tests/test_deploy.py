"""Deployment files: Dockerfile, docker compose, Prometheus, Grafana, Kubernetes (issue #6).

No Docker engine or cluster runs on these machines, so the files are checked against what
they deploy: the real CLI parser (every command they run parses), the real Settings class
(every SOFTVQ_* variable exists and its value validates), the metric registry and the Redis
stream layout. Then live: ``softvq serve`` (the image's CMD) answers the image's HEALTHCHECK,
and in both topologies (embedded, and API + worker over a real Redis as compose runs them)
the /metrics output holds every series and label the dashboards and alerts query. promtool,
when installed, validates the rules and runs their unit tests (deploy/prometheus/alerts_test.yml);
a real Prometheus, when installed, runs the repo's config against the API + worker and
evaluates every alert rule and dashboard query.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.redis_server import RedisServer, free_port, free_ports

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
RECORDING = DEPLOY / "prometheus" / "recording.yml"
K8S = DEPLOY / "k8s"
DOCS = [ROOT / "README.md", ROOT / "docs" / "DEPLOY.md"]


# --- readers ------------------------------------------------------------------------------
class ComposeLoader(yaml.SafeLoader):
    """SafeLoader that also reads compose's merge tags (``!reset``, ``!override``)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)
ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: (
        loader.construct_mapping(node)
        if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node)
    ),
)


def load_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def compose() -> dict:
    return load_yaml(COMPOSE)


def k8s_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s_find(kind: str, name: str) -> dict:
    found = [d for _, d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} manifests"
    return found[0]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec (JSON) form: {args}"
    return value


def dashboards() -> list[dict]:
    paths = sorted(DASHBOARD_DIR.glob("*.json"))
    assert paths, "no dashboards"
    return [json.loads(p.read_text()) for p in paths]


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    out = []
    for d in dashboards():
        for p in d["panels"]:
            for t in p.get("targets", []):
                out.append((f"{d['uid']}/{p['title']}", t["expr"]))
        for v in d.get("templating", {}).get("list", []):
            if v.get("type") == "query":
                q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                out.append((f"{d['uid']}/${v['name']}", q))
    return out


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def alert_exprs() -> list[tuple[str, str]]:
    return [(r["alert"], r["expr"]) for r in alert_rules()]


# --- what the code defines ----------------------------------------------------------------
def settings_env_names() -> set[str]:
    from service.settings import Settings

    return {f"SOFTVQ_{name.upper()}" for name in Settings.model_fields}


def defined_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Exported series name -> (type, label names), from service/metrics.py."""
    from prometheus_client.metrics import MetricWrapperBase

    import service.metrics as m

    out = {}
    for obj in vars(m).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        (family,) = obj.describe()
        labels = tuple(obj._labelnames)
        if family.type == "counter":
            out[family.name + "_total"] = ("counter", labels)
        elif family.type == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[family.name + suffix] = (
                    "histogram",
                    labels + (("le",) if suffix == "_bucket" else ()),
                )
        else:
            out[family.name] = (family.type, labels)
    return out


def build_parser():
    from service.cli import build_parser

    return build_parser()


def parse_command(argv: list[str]):
    """The real ``softvq`` parser on ``argv`` (without the program name)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(
            f"`softvq {shlex.join(argv)}` does not parse (exit {e.code})"
        ) from None


# --- PromQL, superficially -----------------------------------------------------------------
PROMQL_FUNCS_AND_KEYWORDS = {
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "rate",
    "increase",
    "irate",
    "deriv",
    "changes",
    "by",
    "without",
    "and",
    "or",
    "unless",
    "on",
    "ignoring",
    "histogram_quantile",
    "label_values",
    "clamp_min",
    "absent",
    "up",
    "offset",
    "bool",
    "group_left",
    "group_right",
    "topk",
    "bottomk",
}
METRIC_RE = re.compile(r"\b(softvq_[a-zA-Z0-9_]+)")
STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
BY_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SELECTOR_RE = re.compile(r"\b(softvq_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def balanced(expr: str) -> bool:
    pairs, stack = {")": "(", "}": "{", "]": "["}, []
    for ch in STRING_RE.sub('""', expr):
        if ch in "({[":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack


def all_exprs() -> list[tuple[str, str]]:
    return dashboard_exprs() + alert_exprs()


def worker_liveness_probe() -> list[str]:
    """The worker's liveness check as the deploy files run it: ``softvq worker --check``
    without the CLI's torch import (service/liveness.py). The same in compose and k8s."""
    return ["python3", "-m", "service.liveness"]


# --- static checks ---------------------------------------------------------------------------
def test_every_deploy_file_parses():
    assert set(compose()["services"]) == {"redis", "api", "worker", "prometheus", "grafana"}
    assert load_yaml(DEPLOY / "compose.cpu.yml")["services"]["worker"]["deploy"] is None
    for path in DEPLOY.rglob("*.yml"):
        assert yaml.load(path.read_text(), Loader=ComposeLoader) is not None, path
    docs = k8s_docs()
    assert {d["kind"] for _, d in docs} >= {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ScaledObject",
    }
    for name, d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), name
    dashboards()
    # kustomization lists every manifest, so `kubectl apply -k deploy/k8s` deploys them all
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == manifests


def all_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `softvq`) of every process the deploy files start with our image."""
    instr = dockerfile()
    (entry,) = [exec_form(a) for i, a in instr if i == "ENTRYPOINT"]
    (cmd,) = [exec_form(a) for i, a in instr if i == "CMD"]
    assert entry == ["softvq"], "the image's entry point is the softvq console script"
    out = [("Dockerfile CMD", cmd)]
    for name in ("api", "worker"):
        out.append((f"compose {name}", compose()["services"][name]["command"]))
    for fname, d in k8s_docs():
        if d["kind"] != "Deployment":
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            if c["image"].startswith("softvq-serve"):
                assert "command" not in c, "keep the image's ENTRYPOINT (softvq)"
                out.append((f"{fname}:{c['name']}", c["args"]))
    return out


def test_commands_are_real_softvq_subcommands():
    seen = set()
    for where, argv in all_commands():
        args = parse_command(argv)
        assert args.command in {"serve", "worker"}, where
        assert callable(args.func), where
        seen.add(args.command)
        if args.command == "serve":
            assert args.host == "0.0.0.0", f"{where}: a container must listen on all interfaces"
    assert seen == {"serve", "worker"}


def test_commands_are_the_documented_ones():
    text = "\n".join(p.read_text() for p in DOCS if p.exists())
    for where, argv in all_commands():
        assert f"softvq {argv[0]}" in text, f"{where}: `softvq {argv[0]}` is not documented"


def test_no_cli_flag_in_deploy_files_is_unknown():
    """Every --flag any deploy file passes to softvq exists on that subcommand."""
    for where, argv in all_commands():
        args = parse_command(argv)
        flags = [a for a in argv if a.startswith("--")]
        sub = build_parser()._subparsers._group_actions[0].choices[args.command]
        known = {s for a in sub._actions for s in a.option_strings}
        assert set(flags) <= known, f"{where}: {set(flags) - known}"


# --- SOFTVQ_* settings -----------------------------------------------------------------------
SETTING_FILES = [
    DOCKERFILE,
    COMPOSE,
    DEPLOY / "compose.env",
    DEPLOY / "compose.cpu.yml",
    *sorted(K8S.glob("*.yaml")),
    ROOT / "docs" / "DEPLOY.md",
]


def test_every_softvq_variable_named_is_a_setting():
    names = settings_env_names()
    for path in SETTING_FILES:
        if not path.exists():
            continue
        for var in set(re.findall(r"\bSOFTVQ_[A-Z0-9_]+\b", path.read_text())):
            assert var in names, f"{path.relative_to(ROOT)}: {var} is not in service/settings.py"


def env_file(path: Path) -> tuple[dict, dict]:
    """(active, commented-out examples) KEY=value pairs of a compose env file."""
    active, examples = {}, {}
    for line in path.read_text().splitlines():
        m = re.match(r"^(#\s*)?(SOFTVQ_[A-Z0-9_]+)=(.*)$", line.strip())
        if m:
            (examples if m.group(1) else active)[m.group(2)] = m.group(3)
    return active, examples


def configmap_examples(text: str) -> dict:
    """`#   SOFTVQ_X: value` lines in a manifest's comments (documented alternatives)."""
    out = {}
    for m in re.finditer(r"^\s*#\s+(SOFTVQ_[A-Z0-9_]+):\s*(.+)$", text, re.M):
        out[m.group(1)] = yaml.safe_load(m.group(2))
    return out


def environments() -> list[tuple[str, dict]]:
    """Every set of SOFTVQ_* values some process of the deployment would get."""
    out = []
    docker_env = {}
    for instr, args in dockerfile():
        if instr == "ENV":
            for tok in shlex.split(args):
                k, _, v = tok.partition("=")
                docker_env[k] = v
    out.append(("Dockerfile ENV", docker_env))

    active, examples = env_file(DEPLOY / "compose.env")
    out.append(("compose.env", {**docker_env, **active}))
    out.append(("compose.env examples", {**docker_env, **active, **examples}))
    for name in ("api", "worker"):
        svc = compose()["services"][name]
        out.append((f"compose {name}", {**docker_env, **active, **(svc.get("environment") or {})}))
    cpu = load_yaml(DEPLOY / "compose.cpu.yml")["services"]["worker"]["environment"]
    out.append(("compose.cpu.yml worker", {**docker_env, **active, **cpu}))

    cm_text = (K8S / "configmap.yaml").read_text()
    cm = k8s_find("ConfigMap", "softvq-config")["data"]
    out.append(("configmap examples", {**docker_env, **cm, **configmap_examples(cm_text)}))
    for fname, d in k8s_docs():
        if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("softvq-"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
                out.append((f"{fname}:{c['name']}", {**docker_env, **cm, **env}))
    return out


def test_every_environment_validates_as_settings(monkeypatch):
    from service.settings import Settings

    for var in [k for k in os.environ if k.startswith("SOFTVQ_")]:
        monkeypatch.delenv(var)
    names = settings_env_names()
    for where, env in environments():
        softvq = {k: str(v) for k, v in env.items() if k.startswith("SOFTVQ_")}
        assert set(softvq) <= names, f"{where}: {set(softvq) - names}"
        with monkeypatch.context() as m:
            for k, v in softvq.items():
                m.setenv(k, v)
            try:
                s = Settings()
            except Exception as e:  # ValidationError or SettingsError, both say which field
                raise AssertionError(f"{where}: {e}") from None
        if "SOFTVQ_HOST" in softvq:
            assert s.host == "0.0.0.0", where
        if "examples" in where:  # the documented released-weights setup names real pairs
            assert set(s.tokenizers) and set(s.generators), where
            assert {g.tokenizer for g in s.generators.values()} <= set(s.tokenizers), where


def test_redis_url_agrees_between_flags_and_environment():
    active, _ = env_file(DEPLOY / "compose.env")
    for name in ("api", "worker"):
        argv = compose()["services"][name]["command"]
        assert parse_command(argv).redis == active["SOFTVQ_REDIS_URL"], name
        assert urlparse(active["SOFTVQ_REDIS_URL"]).hostname == "redis"


# --- Dockerfile ------------------------------------------------------------------------------
def test_dockerfile_is_multi_stage_gpu_by_default_cpu_by_argument():
    instr = dockerfile()
    froms = [a for i, a in instr if i == "FROM"]
    stages = [a.split()[-1] for a in froms if len(a.split()) == 3 and a.split()[1].upper() == "AS"]
    assert len(froms) >= 3 and {"builder", "runtime"} <= set(stages)
    assert froms[-1].startswith("os-${VARIANT}") and stages[-1] == "runtime"
    args = {}  # defaults (a stage re-declares an ARG without one to use it)
    for i, a in instr:
        if i == "ARG" and "=" in a:
            args.setdefault(a.partition("=")[0], a.partition("=")[2])
    assert args["VARIANT"] == "gpu"
    assert "nvidia/cuda" in args["CUDA_IMAGE"] and "runtime" in args["CUDA_IMAGE"]
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_INDEX_CPU"] == "https://download.pytorch.org/whl/cpu"
    runs = " ".join(a for i, a in instr if i == "RUN")
    assert '"$VARIANT" = "cpu"' in runs and "$TORCH_INDEX_CPU" in runs
    assert "torch==${TORCH_VERSION}" in runs
    copies = [a for i, a in instr if i == "COPY"]
    assert any(a.startswith("--from=builder /opt/venv") for a in copies)


def test_dockerfile_runs_as_non_root_with_a_healthcheck_on_healthz():
    instr = dockerfile()
    users = [a for i, a in instr if i == "USER"]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root uid (runAsNonRoot can check it)"
    # the same uid the Kubernetes pods run as
    for name in ("softvq-api", "softvq-worker"):
        pod = k8s_find("Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == int(uid)
        assert pod["securityContext"]["runAsNonRoot"] is True
    (health,) = [a for i, a in instr if i == "HEALTHCHECK"]
    assert "/healthz" in health and "CMD" in health
    env = " ".join(a for i, a in instr if i == "ENV")
    assert "SOFTVQ_HOST=0.0.0.0" in env


def healthcheck_argv() -> list[str]:
    (health,) = [a for i, a in dockerfile() if i == "HEALTHCHECK"]
    return exec_form(health[health.index("CMD") + 3 :].strip())


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matches a path or a parent."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pat = line.startswith("!"), line.lstrip("!").rstrip("/")
        rx = re.escape(pat).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        rx = rx.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        if any(re.fullmatch(rx, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_sends_the_package_and_nothing_else():
    for keep in (
        "pyproject.toml",
        "README.md",
        "model/tokenizer.py",
        "service/app.py",
        "model/demo_weights/softvq-demo-64/model.safetensors",
        "model/demo_weights/softvq-demo-64/config.json",
    ):
        assert not dockerignore_excludes(keep), keep
    for drop in (
        "tests/test_api.py",
        ".git/config",
        "weights/softvq-l-64/model.safetensors",
        "model/__pycache__/vit.cpython-311.pyc",
        "runs/ckpt.pt",
        "deploy/k8s/api.yaml",
        "softvq_serve.egg-info/PKG-INFO",
    ):
        assert dockerignore_excludes(drop), drop
    # the demo weights are package data, so a non-editable install carries them
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"demo_weights/*/*.safetensors"' in pyproject


# --- docker compose ----------------------------------------------------------------------
def test_compose_redis_persists_the_queue():
    redis = compose()["services"]["redis"]
    cmd = redis["command"]
    assert cmd[0] == "redis-server" and cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"]), "AOF on a volume"
    assert redis["image"].split(":")[1].split(".")[0] >= "7", "consumer-group lag needs Redis 7"


def test_compose_worker_reserves_a_gpu_and_scales():
    svc = compose()["services"]
    worker = svc["worker"]
    (dev,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    # --scale worker=N: no fixed container name, no published host port
    assert "container_name" not in worker and "ports" not in worker
    # the worker's health check is its liveness probe (not /metrics: see worker_liveness_probe)
    assert worker["healthcheck"]["test"] == ["CMD", *worker_liveness_probe()]
    # API: the published port is the one it serves, its health check the image's
    api = parse_command(svc["api"]["command"])
    assert any(p.endswith(f":{api.port}") for p in svc["api"]["ports"])
    assert f"{api.port}/healthz" in " ".join(svc["api"]["healthcheck"]["test"])
    # weights come from a read-only volume at /models
    for name in ("api", "worker"):
        assert any(v.endswith(":/models:ro") for v in svc[name]["volumes"]), name
    assert svc["api"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_publishes_ports_on_localhost_unless_told_otherwise():
    """Every published port binds DEPLOY_BIND_ADDRESS, 127.0.0.1 by default (issue #18)."""
    published = {n: s["ports"] for n, s in compose()["services"].items() if "ports" in s}
    assert set(published) == {"api", "prometheus", "grafana"}
    for name, ports in published.items():
        for p in ports:
            assert p.startswith("${DEPLOY_BIND_ADDRESS:-127.0.0.1}:"), (name, p)


def test_compose_cache_volume_is_the_images_cache_dir_owned_by_the_service_user():
    """The softvq-cache volume is mounted where the service writes ONNX exports and backend
    decisions (~/.cache/softvq of the image's user), and the image makes that directory as
    that user: a fresh named volume copies the ownership, so uid 10001 can write to it."""
    from model.backends.onnxrt import default_cache_dir

    svc = compose()["services"]
    home = "/home/softvq"
    cache = str(default_cache_dir()).replace(str(Path.home()), home)
    assert cache == f"{home}/.cache/softvq"
    for name in ("api", "worker"):
        assert f"softvq-cache:{cache}" in svc[name]["volumes"], name
    assert "softvq-cache" in compose()["volumes"]
    runs = " ".join(a for i, a in dockerfile() if i == "RUN")
    assert f"--home-dir {home}" in runs and f"mkdir -p /models {cache}" in runs
    assert f"chown -R softvq:softvq {home}/.cache" in runs


def test_dockerfile_takes_pip_settings_as_secrets_and_pulls_no_frontend():
    """No `# syntax=` image to pull; every pip step can read the pip.conf / pip-ca build
    secrets (a mirror, find-links, a proxy's CA) and nothing of them reaches the runtime
    stage (deploy/smoke/run.sh checks the built image too)."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax=", text, re.M)
    instr = dockerfile()
    for i, a in instr:
        if i == "RUN" and "pip install" in a:
            assert "--mount=type=secret,id=pip.conf" in a and "--mount=type=secret,id=pip-ca" in a
    stages, current = {}, None
    for i, a in instr:
        if i == "FROM":
            current = a.split()[-1]
        stages.setdefault(current, []).append((i, a))
    assert "PIP_CONFIG_FILE=/run/secrets/pip.conf" in " ".join(
        a for i, a in stages["builder"] if i == "ENV"
    )
    assert "PIP_" not in " ".join(a for i, a in stages["runtime"] if i in ("ENV", "ARG"))


def test_smoke_override_swaps_images_only_and_leaves_grafana_out():
    """deploy/smoke/compose.smoke.yml changes images (local builds of the same programs),
    pull policies and Grafana's profile; every command, health check, volume, port and
    environment of the stack stays the real file's."""
    override = load_yaml(DEPLOY / "smoke" / "compose.smoke.yml")["services"]
    allowed = {"image", "pull_policy"}
    for name, svc in override.items():
        assert name in compose()["services"], name
        if name == "grafana":
            assert svc == {"profiles": ["grafana"]}
            continue
        assert set(svc) <= allowed, (name, set(svc) - allowed)
    assert set(override["redis"]) == set(override["prometheus"]) == allowed
    # the stand-in images keep the contract the compose file relies on
    redis = (DEPLOY / "smoke" / "redis.Dockerfile").read_text()
    assert "redis-server" in redis and "WORKDIR /data" in redis and "USER redis" in redis
    prom = (DEPLOY / "smoke" / "prometheus.Dockerfile").read_text()
    assert 'ENTRYPOINT ["/usr/bin/prometheus"]' in prom and "/prometheus" in prom


def test_smoke_script_cleans_up_on_every_exit_and_stays_on_localhost():
    script = (DEPLOY / "smoke" / "run.sh").read_text()
    assert subprocess.run(["bash", "-n", str(DEPLOY / "smoke" / "run.sh")]).returncode == 0
    assert "trap cleanup EXIT" in script
    assert "down --volumes --remove-orphans" in script
    assert "exit 77" in script  # no engine: one line, CI goes on
    assert "--scale worker=2" in script and "--no-build" in script
    check = (DEPLOY / "smoke" / "check.py").read_text()
    assert "127.0.0.1" in check
    ci = (ROOT / ".ci" / "run").read_text()
    assert "deploy/smoke/run.sh" in ci and "77" in ci


def test_smoke_pip_settings_serve_local_indexes_on_localhost(tmp_path):
    """deploy/smoke/pip_settings.py rewrites local find-links / file:// indexes / constraint
    files to URLs on 127.0.0.1 and serves them, relative links of an index included."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "demo-1.0-py3-none-any.whl").write_bytes(b"whl")
    index = tmp_path / "mirror" / "simple" / "demo"
    index.mkdir(parents=True)
    (tmp_path / "mirror" / "files").mkdir()
    (tmp_path / "mirror" / "files" / "demo-2.0.tar.gz").write_bytes(b"sdist")
    (index / "index.html").write_text('<a href="../../files/demo-2.0.tar.gz">demo-2.0</a>')
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("demo<3\n")
    conf = tmp_path / "pip.conf"
    conf.write_text(
        f"[global]\nfind-links = {wheels}\n"
        f"extra-index-url = file://{tmp_path / 'mirror' / 'simple'}\nconstraint = {constraints}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=str(conf), PIP_CERT="/nonexistent")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(DEPLOY / "smoke" / "pip_settings.py"), str(out)], env=env
    )
    try:
        end = time.monotonic() + 30
        while not (out / "ready").exists() and time.monotonic() < end:
            time.sleep(0.1)
        ready = json.loads((out / "ready").read_text())
        text = (out / "pip.conf").read_text()
        assert ready["cert"] is None and "cert" not in text  # no such file: no secret
        urls = dict(line.split(" = ", 1) for line in text.splitlines() if " = " in line)
        base = f"http://127.0.0.1:{ready['port']}/"
        find_links = [u for u in urls["find-links"].split() if u.startswith(base)]
        (mirror,) = [u for u in urls["extra-index-url"].split() if u.startswith(base)]
        assert mirror.endswith("/simple/") and urls["constraint"].startswith(base)
        with urllib.request.urlopen(urls["constraint"], timeout=10) as r:
            assert r.read() == b"demo<3\n"
        page = urllib.request.urlopen(mirror + "demo/", timeout=10).read().decode()
        link = re.search(r'href="([^"]+)"', page).group(1)
        with urllib.request.urlopen(urllib.parse.urljoin(mirror + "demo/", link)) as r:
            assert r.read() == b"sdist"
        listing = b"".join(urllib.request.urlopen(u, timeout=10).read() for u in find_links)
        assert b"demo-1.0-py3-none-any.whl" in listing
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_prometheus_scrapes_the_api_and_every_worker_replica():
    svc = compose()["services"]
    prom = svc["prometheus"]
    mount = next(v for v in prom["volumes"] if v.startswith("./deploy/prometheus:"))
    container_dir = mount.split(":")[1]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for f in config["rule_files"]:
        assert f.startswith(container_dir + "/")
        assert (DEPLOY / "prometheus" / f[len(container_dir) + 1 :]).is_file(), f
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    want = {
        "softvq-api": ("api", parse_command(svc["api"]["command"]).port),
        "softvq-worker": ("worker", parse_command(svc["worker"]["command"]).metrics_port),
    }
    for job, (service, port) in want.items():
        (sd,) = jobs[job]["dns_sd_configs"]  # DNS: one A record per replica
        assert sd["names"] == [service] and sd["type"] == "A" and sd["port"] == port
        assert jobs[job].get("metrics_path", "/metrics") == "/metrics"


def test_grafana_is_provisioned_from_the_repo_for_anonymous_viewers():
    graf = compose()["services"]["grafana"]
    env = graf["environment"]
    assert (
        env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    )
    mounts = dict(v.split(":")[:2] for v in graf["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dash_dir = mounts["./deploy/grafana/dashboards"]
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/softvq.yml")["providers"][0]
    assert provider["options"]["path"] == dash_dir and provider["type"] == "file"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dash_dir + "/") and (DASHBOARD_DIR / Path(home).name).is_file()
    # the datasource points at the compose Prometheus
    (ds,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert urlparse(ds["url"]).hostname == "prometheus" and urlparse(ds["url"]).port == 9090
    assert any(p.endswith(":9090") for p in compose()["services"]["prometheus"]["ports"])


# --- dashboards and alerts, statically ------------------------------------------------------
def test_dashboard_json_is_what_the_script_writes():
    spec = importlib.util.spec_from_file_location(
        "build_dashboard", DEPLOY / "grafana/build_dashboard.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.OUT.read_text() == mod.render(), "run python3 deploy/grafana/build_dashboard.py"


def test_dashboards_use_the_provisioned_datasource():
    (ds,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    uids = set()

    def walk(x):
        if isinstance(x, dict):
            if isinstance(x.get("datasource"), dict):
                uids.add(x["datasource"]["uid"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for d in dashboards():
        walk(d)
    assert uids == {ds["uid"]}


def test_dashboard_layout_is_sane():
    for d in dashboards():
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids))
        cells = set()
        for p in d["panels"]:
            g = p["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
            mine = {
                (x, y)
                for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])
            }
            assert not mine & cells, f"{p['title']} overlaps another panel"
            cells |= mine
            if p["type"] != "row":
                assert p["targets"] and p["description"], p["title"]


def panels_querying(metric: str) -> list[dict]:
    return [
        p
        for d in dashboards()
        for p in d["panels"]
        if any(metric in t["expr"] for t in p.get("targets", []))
    ]


def test_dashboards_show_what_the_issue_asks_for():
    exprs = " ".join(e for _, e in dashboard_exprs())
    # throughput, images/s and tokens/s, per model and task
    for counter in ("softvq_images_processed_total", "softvq_tokens_processed_total"):
        assert any(
            re.search(rf"sum by \((model, task|task, model)\) \(rate\({counter}", t["expr"])
            for p in panels_querying(counter)
            for t in p["targets"]
        ), counter
    # models side by side: a bar panel with one bar per (model, task)
    assert any(p["type"] == "bargauge" for p in panels_querying("softvq_images_processed_total"))
    # latency p50/p95/p99
    for q in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({q}, sum by (le, endpoint) (rate(softvq_request_duration_seconds_bucket"
            in exprs
        )
    assert panels_querying("softvq_queue_depth")
    assert any(p["type"] == "heatmap" for p in panels_querying("softvq_batch_size_bucket"))
    assert "sum by (status) (rate(softvq_requests_total" in exprs
    assert panels_querying("softvq_worker_busy_seconds_total")
    (gpu,) = panels_querying("softvq_gpu_memory_bytes")
    assert gpu["fieldConfig"]["defaults"]["unit"] == "bytes"


def test_alerts_cover_the_issue():
    rules = {r["alert"]: r for r in alert_rules()}
    assert {
        "SoftvqHighErrorRate",
        "SoftvqQueueBacklogGrowing",
        "SoftvqNoReadyWorkers",
        "SoftvqLatencyObjectiveMissed",
    } <= set(rules)
    for r in rules.values():
        assert r["labels"]["severity"] in {"page", "warning"} and r["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", r["for"])
    assert "softvq_requests_total" in rules["SoftvqHighErrorRate"]["expr"]
    assert "deriv(softvq_queue_depth" in rules["SoftvqQueueBacklogGrowing"]["expr"]
    assert "softvq_workers_alive" in rules["SoftvqNoReadyWorkers"]["expr"]
    assert "softvq_request_duration_seconds_bucket" in rules["SoftvqLatencyObjectiveMissed"]["expr"]


def test_promql_is_well_formed():
    for where, expr in all_exprs():
        assert expr.strip() and balanced(expr), f"{where}: unbalanced: {expr}"
        bare = STRING_RE.sub('""', expr)
        words = set(re.findall(r"\b([a-z_][a-z0-9_]*)\s*\(", bare))
        assert words <= PROMQL_FUNCS_AND_KEYWORDS, (
            f"{where}: unknown functions {words - PROMQL_FUNCS_AND_KEYWORDS}"
        )
        standard = ("up{", "process_start_time_seconds{")  # Prometheus' and the client's own
        assert METRIC_RE.search(expr) or any(m in expr for m in standard), (
            f"{where}: queries no metric"
        )


def check_names_and_labels(where: str, expr: str, exported: dict[str, set[str]]) -> None:
    """Every softvq_* series in ``expr`` is in ``exported`` (name -> label names) and every
    label it filters or groups on exists on the series it is applied to."""
    names = set(METRIC_RE.findall(expr))
    for name in names:
        assert name in exported, f"{where}: {name} is not exported"
    for name, matchers in SELECTOR_RE.findall(expr):
        for label, _, _ in MATCHER_RE.findall(matchers):
            assert label in exported[name], f"{where}: {name} has no label {label!r}"
    available = set().union(*(exported[n] for n in names)) | {"instance", "job"}
    for group in BY_RE.findall(expr):
        for label in filter(None, (s.strip() for s in group.split(","))):
            assert label in available, f"{where}: no series has label {label!r} to group by"


def test_queried_metrics_and_labels_are_defined_in_service_metrics():
    exported = {n: set(labels) for n, (_, labels) in defined_metrics().items()}
    for where, expr in all_exprs():
        check_names_and_labels(where, expr, exported)


def test_recording_rules_read_exported_series_and_are_loaded():
    exported = {n: set(labels) for n, (_, labels) in defined_metrics().items()}
    rules = [r for g in yaml.safe_load(RECORDING.read_text())["groups"] for r in g["rules"]]
    records = {r["record"] for r in rules}
    assert "model:softvq_generate_speedup_vs_2d:rate5m" in records
    for r in rules:
        expr = r["expr"]
        for name in sorted(records, key=len, reverse=True):  # rules reading earlier rules
            expr = expr.replace(name, "")
        check_names_and_labels(r["record"], expr, exported)
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert any(f.endswith("/recording.yml") for f in config["rule_files"])


# --- promtool (validates PromQL fully and runs the alert unit tests) ------------------------
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed"
)


@needs_promtool
def test_promtool_accepts_config_rules_and_dashboard_queries(tmp_path):
    def promtool(*args):
        r = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr

    promtool("check", "config", "--syntax-only", str(DEPLOY / "prometheus/prometheus.yml"))
    promtool("check", "rules", str(ALERTS))
    promtool("check", "rules", str(RECORDING))
    # dashboard queries as recording rules, with Grafana's variables filled in
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": e.replace("$__rate_interval", "1m").replace("$model", ".*"),
        }
        for i, (_, e) in enumerate(dashboard_exprs())
        if not e.startswith("label_values")
    ]
    f = tmp_path / "dashboard_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(f))


@needs_promtool
@pytest.mark.parametrize("unit_tests", ["alerts_test.yml", "recording_test.yml"])
def test_alert_and_recording_rules_do_what_they_should(unit_tests):
    r = subprocess.run(
        ["promtool", "test", "rules", unit_tests],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


# --- Kubernetes -----------------------------------------------------------------------------
def pod_labels(deploy: dict) -> dict:
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    return labels


def test_k8s_api_and_worker_deployments():
    api = k8s_find("Deployment", "softvq-api")
    worker = k8s_find("Deployment", "softvq-worker")
    (a,) = api["spec"]["template"]["spec"]["containers"]
    (w,) = worker["spec"]["template"]["spec"]["containers"]
    port = parse_command(a["args"]).port
    assert {p["containerPort"] for p in a["ports"]} == {port}
    for c in (a, w):
        assert {"configMapRef": {"name": "softvq-config"}} in c["envFrom"]
    # probes: readiness on /readyz, liveness (and startup) on /healthz
    assert a["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert a["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert a["startupProbe"]["httpGet"]["path"] == "/healthz"
    # workers: a GPU each, probes on their /metrics port (served once the models are warm)
    assert str(w["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert "nvidia.com/gpu" not in a["resources"].get("limits", {})
    metrics_port = int(k8s_find("ConfigMap", "softvq-config")["data"]["SOFTVQ_METRICS_PORT"])
    assert parse_command(w["args"]).metrics_port in (None, metrics_port)
    assert {p["containerPort"] for p in w["ports"]} == {metrics_port}
    assert w["startupProbe"]["httpGet"]["path"] == "/metrics"
    # liveness: the check of the file the worker's event loop rewrites (not /metrics, which
    # prometheus-client serves from its own thread while the loop may be stuck)
    assert w["livenessProbe"]["exec"]["command"] == worker_liveness_probe()
    assert "replicas" not in worker["spec"], "KEDA owns the worker replica count"
    # Prometheus annotations point at the ports that serve /metrics
    for d, p in ((api, port), (worker, metrics_port)):
        ann = d["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/port"] == str(p) and ann["prometheus.io/path"] == "/metrics"
    # the weights volume is the claim that exists, read-only
    pvc = k8s_find("PersistentVolumeClaim", "softvq-weights")
    for d in (api, worker):
        vols = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
        assert vols["weights"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        (c,) = d["spec"]["template"]["spec"]["containers"]
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True


def test_k8s_services_and_disruption_budgets_select_real_pods():
    api, worker = k8s_find("Deployment", "softvq-api"), k8s_find("Deployment", "softvq-worker")
    svc = k8s_find("Service", "softvq-api")
    assert svc["spec"]["selector"].items() <= pod_labels(api).items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in {
        p["name"] for p in api["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    pdbs = [d for _, d in k8s_docs() if d["kind"] == "PodDisruptionBudget"]
    covered = set()
    for pdb in pdbs:
        sel = pdb["spec"]["selector"]["matchLabels"]
        for d in (api, worker):
            if sel.items() <= pod_labels(d).items():
                covered.add(d["metadata"]["name"])
    assert covered == {"softvq-api", "softvq-worker"}
    # the Redis the ConfigMap names is the Service that exists
    url = urlparse(k8s_find("ConfigMap", "softvq-config")["data"]["SOFTVQ_REDIS_URL"])
    redis = k8s_find("Service", url.hostname)
    assert url.port in {p["port"] for p in redis["spec"]["ports"]}
    sts = k8s_find("StatefulSet", url.hostname)
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"


def test_compare_profile_overrides_of_compose_and_k8s():
    """deploy/compose.compare.yml and the deploy/k8s-compare overlay turn the compare profile
    on with valid settings, and KEDA scales on the three generators' streams."""
    from service.broker.redis_streams import Keys
    from service.compare import REFERENCE_GENERATORS
    from service.settings import Settings

    override = load_yaml(DEPLOY / "compose.compare.yml")["services"]
    assert set(override) == {"api", "worker"}
    for svc in override.values():
        env = {
            k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in svc["environment"].items()
        }
        assert set(env) <= settings_env_names()
        s = Settings(**{k.removeprefix("SOFTVQ_").lower(): v for k, v in env.items()})
        assert s.compare == "gpu" and s.default_generator in REFERENCE_GENERATORS

    overlay = DEPLOY / "k8s-compare"
    kust = load_yaml(overlay / "kustomization.yaml")
    assert kust["resources"] == ["../k8s"]
    cm = load_yaml(overlay / "configmap-compare.yaml")
    assert cm["metadata"]["name"] == "softvq-config"
    data = {**k8s_find("ConfigMap", "softvq-config")["data"], **cm["data"]}
    assert set(data) <= settings_env_names()
    s = Settings(**{k.removeprefix("SOFTVQ_").lower(): v for k, v in data.items()})
    assert s.compare == "gpu" and s.cache_dir.startswith("/tmp/")  # pods' writable emptyDir
    patch = yaml.safe_load((overlay / "keda-compare.yaml").read_text())
    keys = Keys(Settings().stream_prefix)
    assert {p["value"]["metadata"]["stream"] for p in patch} == {
        keys.stream(g, "generate") for g in REFERENCE_GENERATORS
    }
    assert all(p["op"] == "add" and p["path"] == "/spec/triggers/-" for p in patch)
    if shutil.which("kubectl"):
        r = subprocess.run(
            ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stderr
        assert "SOFTVQ_COMPARE: gpu" in r.stdout


def configured_streams() -> set[tuple[str, str]]:
    """(model, task) of every stream the ConfigMap's models use (the demo ones when unset)."""
    from model import demo
    from service.tasks import TASKS

    data = k8s_find("ConfigMap", "softvq-config")["data"]
    if "SOFTVQ_TOKENIZERS" in data:
        toks = list(json.loads(data["SOFTVQ_TOKENIZERS"]))
        gens = list(json.loads(data.get("SOFTVQ_GENERATORS", "{}")))
    else:
        toks, gens = list(demo.DEMO_TOKENIZERS), list(demo.DEMO_GENERATORS)
    return {(t, task) for t in toks for task in TASKS if task != "generate"} | {
        (g, "generate") for g in gens
    }


def test_keda_scales_workers_on_every_streams_consumer_group_lag():
    from service.broker.redis_streams import Keys
    from service.settings import Settings

    so = k8s_find("ScaledObject", "softvq-worker")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"]["name"] == "softvq-worker"
    assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    keys = Keys(Settings().stream_prefix)
    url = urlparse(k8s_find("ConfigMap", "softvq-config")["data"]["SOFTVQ_REDIS_URL"])
    streams = set()
    for t in so["spec"]["triggers"]:
        assert t["type"] == "redis-streams"
        md = t["metadata"]
        assert md["consumerGroup"] == keys.group
        assert int(md["lagCount"]) >= 1 and int(md["activationLagCount"]) >= 0
        host, port = md["address"].rsplit(":", 1)
        # KEDA runs in its own namespace: <service>.<namespace>.svc... of the same Redis
        assert host.split(".")[:2] == [url.hostname, so["metadata"]["namespace"]]
        assert int(port) == url.port
        streams.add(md["stream"])
    assert streams == {
        keys.stream(m, task, lane)
        for m, task in configured_streams()
        for lane in ("interactive", "batch")
    }


# --- live: the image's commands on tiny models ------------------------------------------------
def http(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def log_tail(proc: subprocess.Popen, chars: int = 3000) -> str:
    """The end of a process's stderr (kept in a temporary file: a pipe nobody reads can
    fill up and block the process)."""
    log = getattr(proc, "log", None)
    if log is None:
        return ""
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-chars:]


def wait_for(url: str, proc: subprocess.Popen, status: int = 200, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log_tail(proc)}"
        if http(url, timeout=5)[0] == status:
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer {status} within {timeout}s:\n{log_tail(proc)}")


def launch(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    proc.log = log
    return proc


def start(argv: list[str], env: dict) -> subprocess.Popen:
    """``softvq <argv>`` as the image runs it (the console script, settings from env)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTVQ_")}
    full_env.update(env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    exe = shutil.which("softvq") or ""
    return launch([exe, *argv] if exe else [sys.executable, "-m", "service.cli", *argv], full_env)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if getattr(proc, "log", None) is not None:
        proc.log.close()


def png_b64(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def one_request_of_each_kind(base: str) -> None:
    """tokenize, decode, reconstruct, generate on both tiny pairs, plus one 4xx."""
    for tok, gen in (("tiny", "sit-tiny"), ("tiny16", "sit-tiny16")):
        status, body = http(f"{base}/tokenize", {"images": [png_b64(0)], "model": tok})
        assert status == 200, body
        tokens = json.loads(body)["tokens"]
        status, body = http(f"{base}/decode", {"tokens": tokens, "model": tok})
        assert status == 200, body
        status, body = http(f"{base}/reconstruct", {"images": [png_b64(1)], "model": tok})
        assert status == 200, body
        status, body = http(
            f"{base}/generate", {"model": gen, "num_images": 2, "seed": 3, "steps": 2}
        )
        assert status == 200, body
    status, body = http(
        f"{base}/generate", {"model": "sit2d-tiny", "num_images": 2, "seed": 3, "steps": 2}
    )
    assert status == 200, body
    status, body = http(f"{base}/generate", {"model": "sit-tiny", "steps": 0})
    assert status == 422 and json.loads(body)["error"], body


def scrape(url: str) -> tuple[dict[str, set[str]], dict[str, list[dict]]]:
    """(exported name -> label names, name -> sample label dicts) of a /metrics page. A
    family with no samples yet still counts as exported (its # TYPE line is there)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http(url)
    assert status == 200
    text = body.decode()
    exported: dict[str, set[str]] = {}
    samples: dict[str, list[dict]] = {}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        if not name.startswith("softvq_"):
            continue
        base = name.removesuffix("_total")
        names = (
            [name] if kind != "histogram" else [f"{base}{s}" for s in ("_bucket", "_sum", "_count")]
        )
        for n in names:
            exported.setdefault(n, set())
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("softvq_"):
                exported.setdefault(s.name, set()).update(s.labels)
                samples.setdefault(s.name, []).append(s.labels)
    return exported, samples


def merge(*scrapes):
    exported, samples = {}, {}
    for e, s in scrapes:
        for k, v in e.items():
            exported.setdefault(k, set()).update(v)
        for k, v in s.items():
            samples.setdefault(k, []).extend(v)
    return exported, samples


def check_scrape(exported: dict[str, set[str]], samples: dict[str, list[dict]]) -> None:
    # labels of a family with no samples yet come from its definition
    defined = {n: set(labels) for n, (_, labels) in defined_metrics().items()}
    for n in exported:
        exported[n] |= defined.get(n, set()) if not exported[n] else set()
    for where, expr in all_exprs():
        check_names_and_labels(where, expr, exported)
    # the series the requests above must have produced, with the labels the panels read
    tasks = {"tokenize", "decode", "reconstruct", "generate"}
    for name in (
        "softvq_images_processed_total",
        "softvq_tokens_processed_total",
        "softvq_batch_size_bucket",
        "softvq_compute_seconds_count",
        "softvq_queue_wait_seconds_count",
    ):
        assert {s["task"] for s in samples.get(name, [])} == tasks, name
        models = {s["model"] for s in samples[name]}
        assert {"tiny", "tiny16"} <= models and {"sit-tiny", "sit-tiny16"} <= models, name
    endpoints = {s["endpoint"] for s in samples["softvq_request_duration_seconds_bucket"]}
    assert {"/tokenize", "/decode", "/reconstruct", "/generate"} <= endpoints
    statuses = {s["status"] for s in samples["softvq_requests_total"]}
    assert {"200", "422"} <= statuses
    # the alert rules' endpoint matchers split the endpoints as intended
    assert [e for e in endpoints if re.fullmatch(".*generate.*", e)] == ["/generate"]
    assert {s["model"] for s in samples["softvq_model_info"]} == TINY_MODELS
    families = {(s["model"], s["family"]) for s in samples["softvq_generator_family"]}
    assert families == {
        ("sit-tiny", "softvq"),
        ("sit-tiny16", "softvq"),
        ("sit2d-tiny", "latent-2d"),
    }
    assert samples["softvq_worker_busy_seconds_total"] and samples["softvq_queue_depth"]


TINY_MODELS = {"tiny", "tiny16", "sit-tiny", "sit-tiny16", "sit2d-tiny"}


@pytest.fixture(scope="module")
def tiny_env(api_env, api_model_root):
    """The tiny models, plus the 2-D baseline (the official SiT/2 layout + a tiny SD-VAE), so
    the speedup rules and panels have a denominator."""
    from model.sd_vae import random_sd_vae, save_sd_vae

    root = Path(api_model_root)
    if not (root / "sit2d-tiny").exists():
        shutil.copytree(ROOT / "tests/fixtures/official-tiny/sit2d", root / "sit2d-tiny")
        save_sd_vae(random_sd_vae(0.0625, 1, sample_size=64), root / "sd-vae-tiny")
    gens = json.loads(api_env["SOFTVQ_GENERATORS"])
    gens["sit2d-tiny"] = {"path": "sit2d-tiny", "tokenizer": "sd-vae-tiny"}
    return {
        **api_env,
        "SOFTVQ_HOST": "127.0.0.1",
        "SOFTVQ_VAES": json.dumps({"sd-vae-tiny": "sd-vae-tiny"}),
        "SOFTVQ_GENERATORS": json.dumps(gens),
    }


def test_image_cmd_serves_healthcheck_and_every_queried_metric(tiny_env):
    """Embedded mode: `softvq serve` exactly as the image's CMD runs it (port changed)."""
    (cmd,) = [exec_form(a) for i, a in dockerfile() if i == "CMD"]
    port = free_port()
    argv = [*cmd]
    argv[argv.index("--host") + 1] = "127.0.0.1"  # tests talk to 127.0.0.1 only
    argv[argv.index("--port") + 1] = str(port)
    proc = start(argv, tiny_env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/readyz", proc)
        # the image's HEALTHCHECK command, run as Docker would run it
        hc = healthcheck_argv()
        env = {**os.environ, "SOFTVQ_PORT": str(port)}
        assert subprocess.run(hc, env=env, timeout=30).returncode == 0
        env["SOFTVQ_PORT"] = str(free_port())  # nothing listens there: it must fail
        assert subprocess.run(hc, env=env, timeout=30, capture_output=True).returncode != 0
        one_request_of_each_kind(base)
        check_scrape(*scrape(f"{base}/metrics"))
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def compose_topology(tiny_env, tmp_path_factory):
    """The compose stack in miniature: redis-server, `softvq serve --redis` and `softvq worker
    --redis --metrics-port` (their compose commands, ports changed), after one request of each
    kind. Yields {"api": url, "worker": url, "redis": url, "liveness_file": the worker's}."""
    svc = compose()["services"]
    liveness_file = str(tmp_path_factory.mktemp("worker") / "softvq-worker.alive")
    with RedisServer() as server:
        api_port, metrics_port = free_ports(2)
        api_argv = list(svc["api"]["command"])
        api_argv[api_argv.index("--host") + 1] = "127.0.0.1"
        api_argv[api_argv.index("--port") + 1] = str(api_port)
        api_argv[api_argv.index("--redis") + 1] = server.url
        worker_argv = list(svc["worker"]["command"])
        worker_argv[worker_argv.index("--redis") + 1] = server.url
        worker_argv[worker_argv.index("--metrics-port") + 1] = str(metrics_port)
        env = {
            **tiny_env,
            "SOFTVQ_REDIS_URL": server.url,
            "SOFTVQ_WORKER_LIVENESS_FILE": liveness_file,  # compose's default is /tmp/...
        }
        worker = start(worker_argv, env)
        api = start(api_argv, env)
        urls = {
            "api": f"http://127.0.0.1:{api_port}",
            "worker": f"http://127.0.0.1:{metrics_port}",
            "redis": server.url,
            "liveness_file": liveness_file,
        }
        try:
            wait_for(f"{urls['worker']}/metrics", worker)  # what k8s' startup probe asks
            wait_for(f"{urls['api']}/healthz", api)
            wait_for(f"{urls['api']}/readyz", api)
            one_request_of_each_kind(urls["api"])
            yield urls
        finally:
            stop(api)
            stop(worker)


@pytest.mark.redis
def test_compose_topology_api_and_worker_over_redis_export_every_queried_metric(
    compose_topology,
):
    """Prometheus scrapes both processes; together they export every series the dashboards
    and alerts query. The worker creates the consumer group KEDA reads, on every stream."""
    import redis as redis_py

    from service.broker.redis_streams import Keys
    from service.tasks import TASKS

    api_scrape = scrape(f"{compose_topology['api']}/metrics")
    worker_scrape = scrape(f"{compose_topology['worker']}/metrics")
    check_scrape(*merge(api_scrape, worker_scrape))
    # KEDA's view: the group exists on every stream and Redis reports its lag
    keys = Keys("softvq")
    r = redis_py.Redis.from_url(compose_topology["redis"])
    pairs = [(t, k) for t in ("tiny", "tiny16") for k in TASKS if k != "generate"]
    for m, task in pairs + [("sit-tiny", "generate"), ("sit-tiny16", "generate")]:
        groups = {g["name"].decode(): g for g in r.xinfo_groups(keys.stream(m, task))}
        assert "lag" in groups[keys.group], (m, task)
        assert groups[keys.group]["lag"] == 0  # every job was delivered
    r.close()


@pytest.mark.redis
def test_worker_liveness_probe_of_compose_and_k8s_passes_for_the_running_worker(
    compose_topology, tmp_path
):
    """The health check compose runs in the worker container and the exec liveness probe of
    the k8s Deployment, run as they are run (same argv, the worker's environment): exit 0
    while the compose-started worker runs; exit 1 where no worker ever ran. `softvq worker
    --check` (the documented form) agrees."""
    hc = compose()["services"]["worker"]["healthcheck"]["test"]
    assert hc[0] == "CMD"
    (w,) = k8s_find("Deployment", "softvq-worker")["spec"]["template"]["spec"]["containers"]
    probes = [hc[1:], w["livenessProbe"]["exec"]["command"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTVQ_")}
    live = {**env, "SOFTVQ_WORKER_LIVENESS_FILE": compose_topology["liveness_file"]}
    nobody = {**env, "SOFTVQ_WORKER_LIVENESS_FILE": str(tmp_path / "never-written")}
    for argv in probes:
        argv = [sys.executable if a == "python3" else a for a in argv]
        done = subprocess.run(argv, env=live, cwd=tmp_path, capture_output=True, timeout=30)
        assert done.returncode == 0, done
        t0 = time.monotonic()
        done = subprocess.run(argv, env=nobody, cwd=tmp_path, capture_output=True, timeout=30)
        assert done.returncode == 1 and b"no liveness file" in done.stderr, done
        assert time.monotonic() - t0 < 5  # cheap: no torch import in the probe
    exe = shutil.which("softvq")
    cli = [exe] if exe else [sys.executable, "-m", "service.cli"]
    done = subprocess.run([*cli, "worker", "--check"], env=live, capture_output=True, timeout=60)
    assert done.returncode == 0 and b"alive" in done.stdout, done


# Queries allowed to return nothing after a healthy run: errors, retries, GPU memory on CPU.
MAY_BE_EMPTY = (
    'status=~"5..|429"',
    "softvq_jobs_failed_total",
    "softvq_job_retries_total",
    "softvq_gpu_memory_bytes",
)


def prom_query(base: str, expr: str) -> list:
    status, body = http(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    reply = json.loads(body or b"{}")
    assert status == 200 and reply.get("status") == "success", f"{expr}: {body[:300]}"
    return reply["data"]["result"]


@pytest.mark.redis
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")
def test_real_prometheus_evaluates_every_dashboard_query_and_alert(compose_topology, tmp_path):
    """deploy/prometheus/prometheus.yml, with its DNS discovery swapped for the two test
    processes, run by a real Prometheus: both targets up, every alert rule evaluates without
    error, and every dashboard query returns series (except the ones about errors)."""
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS), str(RECORDING)]
    targets = {"softvq-api": compose_topology["api"], "softvq-worker": compose_topology["worker"]}
    for job in config["scrape_configs"]:
        if job["job_name"] in targets:
            del job["dns_sd_configs"]
            job["static_configs"] = [{"targets": [urlparse(targets[job["job_name"]]).netloc]}]
    config["scrape_configs"] = [j for j in config["scrape_configs"] if j["job_name"] in targets]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prom = launch(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/-/ready", prom)
        end = time.monotonic() + 60
        while time.monotonic() < end:  # a few scrapes of both targets, so rate() has points
            up = prom_query(base, 'count_over_time(up{job=~"softvq.*"}[1m]) >= 4')
            if len(up) == 2:
                break
            time.sleep(0.5)
        assert {r["metric"]["job"] for r in prom_query(base, 'up{job=~"softvq.*"} == 1')} == set(
            targets
        )
        # every alert rule evaluated, none with an error
        time.sleep(2)
        status, body = http(f"{base}/api/v1/rules")
        rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
        records = [r for g in yaml.safe_load(RECORDING.read_text())["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()} | {
            r["record"] for r in records
        }
        for r in rules:
            assert r["health"] == "ok", f"{r['name']}: {r.get('lastError')}"
        # every dashboard query, with Grafana's variables as Grafana fills them
        for where, expr in dashboard_exprs():
            if expr.startswith("label_values("):
                metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", expr).groups()
                values = {r["metric"][label] for r in prom_query(base, metric)}
                assert values == TINY_MODELS, where
                continue
            q = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
            result = prom_query(base, q)
            if not any(marker in expr for marker in MAY_BE_EMPTY):
                assert result, f"{where}: no data for {q}"
        # the speedup vs the 2-D baseline, recorded from what the worker exports under load
        speedup = "model:softvq_generate_speedup_vs_2d:rate5m"
        end = time.monotonic() + 60
        got = {}
        while time.monotonic() < end and len(got) < 3:
            for gen in ("sit-tiny", "sit-tiny16", "sit2d-tiny"):
                status, body = http(
                    f"{compose_topology['api']}/generate",
                    {"model": gen, "num_images": 2, "seed": 5, "steps": 2},
                )
                assert status == 200, body
            got = {
                r["metric"]["model"]: float(r["value"][1])
                for r in prom_query(base, speedup)
                if math.isfinite(float(r["value"][1]))
            }
            time.sleep(1)
        assert set(got) == {"sit-tiny", "sit-tiny16", "sit2d-tiny"}, got
        assert got["sit2d-tiny"] == pytest.approx(1.0) and got["sit-tiny"] > 0, got
        # loadtests.compare reading the same counters through this Prometheus (the workers
        # publish no port in compose): every generated image of a phase is counted
        from loadtests import compare

        out = tmp_path / "compare"
        argv = ["--url", compose_topology["api"], "--prometheus", base, "--settle", "4"]
        argv += ["--models", "sit-tiny,sit2d-tiny", "--duration", "2", "--rounds", "1"]
        assert compare.main([*argv, "--concurrency", "2", "--steps", "2", "--out", str(out)]) == 0
        report = json.loads((out / "compare.json").read_text())
        assert report["baseline"] == "sit2d-tiny"
        for r in report["results"].values():
            assert r["images"] == r["requests_ok"] > 0 and r["model_s_per_image"] > 0, r
    finally:
        stop(prom)


@pytest.mark.redis
def test_keda_lag_stays_readable_after_a_request_times_out(tiny_env):
    """A request that times out while queued must leave the lag KEDA scales on readable."""
    import redis as redis_py

    from service.broker.redis_streams import Keys

    keys = Keys("softvq")
    stream = keys.stream("sit-tiny", "generate")
    with RedisServer() as server:
        r = redis_py.Redis.from_url(server.url, decode_responses=True)
        r.xgroup_create(stream, keys.group, id="0", mkstream=True)  # as a worker does
        port = free_port()
        api = start(
            ["serve", "--host", "127.0.0.1", "--port", str(port), "--redis", server.url],
            {**tiny_env, "SOFTVQ_REDIS_URL": server.url},
        )
        try:
            wait_for(f"http://127.0.0.1:{port}/healthz", api)
            # No worker runs, so jobs stay queued: one with a long deadline (a backlog),
            # then one that times out while queued behind it.
            url = f"http://127.0.0.1:{port}/generate"
            waiting = threading.Thread(
                target=http, args=(url, {"model": "sit-tiny", "steps": 2, "timeout_s": 4})
            )
            waiting.start()
            end = time.monotonic() + 10
            while r.xlen(stream) < 1 and time.monotonic() < end:
                time.sleep(0.05)
            status, body = http(url, {"model": "sit-tiny", "steps": 2, "timeout_s": 0.5})
            assert status == 504, body
            while not list(r.scan_iter(match=keys.cancel("*"))) and time.monotonic() < end:
                time.sleep(0.05)
            time.sleep(0.2)  # let the broker finish its cancel writes
            assert r.xlen(stream) >= 1, "the backlog is still queued"
            (group,) = [g for g in r.xinfo_groups(stream) if g["name"] == keys.group]
            assert group["lag"] is not None, "Redis cannot tell the group's lag"
            waiting.join()
        finally:
            stop(api)
            r.close()
