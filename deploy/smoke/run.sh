#!/usr/bin/env bash
# Smoke test of the real Dockerfile and docker-compose.yml on a host with no Docker Hub and no
# download.pytorch.org (only Debian's mirrors and PyPI), such as this project's CI machines:
#
#   1. installs and starts dockerd when none answers (Debian's docker.io; Compose v2 and
#      buildx as Debian's docker-compose / docker-buildx packages when the CLI lacks them);
#   2. makes a base image from Debian packages (debootstrap of bookworm with python3 and
#      python3-venv, `docker import`), cached under $DEPLOY_SMOKE_CACHE by BASE_VERSION;
#      Redis and Prometheus images from Debian's packages on that base (deploy/smoke/*.Dockerfile);
#   3. builds the CPU variant of ./Dockerfile on that base, with this host's pip settings as
#      build secrets (deploy/smoke/pip_settings.py), and records build time and image size;
#   4. runs docker-compose.yml + deploy/compose.cpu.yml + deploy/smoke/compose.smoke.yml
#      (local images for redis and prometheus; no grafana) as compose project softvq-smoke,
#      with two workers, every published port on 127.0.0.1;
#   5. runs deploy/smoke/check.py against it (see there for what is checked);
#   6. removes the project's containers, networks and volumes, also on failure (trap).
#
# Exit status: 0 passed; 77 dockerd cannot run on this host (one line says why; nothing else
# was done); anything else failed. Logs and results: $DEPLOY_SMOKE_CACHE/last/ (results.json,
# build.log, compose.log). DEPLOY_SMOKE_KEEP=1 leaves the stack running (remove it with
# `docker compose -p softvq-smoke down -v`).
#
# `run.sh --gpu-build` instead builds the GPU variant as far as a host without a GPU and
# without nvidia/cuda images can: the os-gpu stage on the Debian base in place of the CUDA
# image, torch 2.13.0 from PyPI (the CUDA build) in place of the cu128 index, the .[gpu]
# extras; then checks what the image holds (no container of it runs a model). Results:
# $DEPLOY_SMOKE_CACHE/last-gpu/results.json. It removes the image afterwards (several GB).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
MODE=stack
case "${1:-}" in
  "") ;;
  --gpu-build) MODE=gpu ;;
  *) echo "usage: $0 [--gpu-build]" >&2; exit 2 ;;
esac

CACHE=${DEPLOY_SMOKE_CACHE:-/var/cache/softvq-smoke}
# Bump BASE_VERSION to remake the base (and the Redis / Prometheus images on it).
BASE_VERSION=bookworm-py3-1
SUITE=bookworm
MIRROR=${DEPLOY_SMOKE_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=softvq-smoke/debian:$BASE_VERSION
REDIS_IMAGE=softvq-smoke/redis:$BASE_VERSION
PROMETHEUS_IMAGE=softvq-smoke/prometheus:$BASE_VERSION
IMAGE=${DEPLOY_SMOKE_IMAGE:-softvq-serve:smoke-cpu}
PROJECT=softvq-smoke
OUT=$CACHE/last
[ $MODE = gpu ] && OUT=$CACHE/last-gpu
log() { printf '[smoke %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

mkdir -p "$CACHE"
rm -rf "$OUT"
mkdir -p "$OUT"

# --- 1. the engine ----------------------------------------------------------------------
engine_unavailable() {
  echo "docker smoke test skipped: $*"
  exit 77
}

start_dockerd() {
  if docker info >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    engine_unavailable "no Docker engine answers and this is not root (cannot start dockerd)"
  fi
  if ! command -v dockerd >/dev/null 2>&1; then
    log "installing docker.io"
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io) \
      >"$OUT/apt-docker.log" 2>&1 || engine_unavailable "apt-get install docker.io failed"
  fi
  log "starting dockerd (nice 10: the containers it runs inherit it)"
  (setsid nohup nice -n 10 dockerd >/var/log/softvq-smoke-dockerd.log 2>&1 &)
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 ||
    engine_unavailable "dockerd does not start here ($(tail -n 1 /var/log/softvq-smoke-dockerd.log 2>/dev/null))"
}

# Compose >= 2.24 (`!reset`, `!override`) and buildx, from Debian's next release when the
# installed CLI lacks them (both are static Go programs that need only libc6 >= 2.34).
compose_ok() {
  local v
  v=$(docker compose version --short 2>/dev/null) || return 1
  v=${v#v}
  [ "$(printf '%s\n' 2.24.0 "${v%%-*}" | sort -V | head -n 1)" = 2.24.0 ]
}

ensure_plugins() {
  local want=()
  compose_ok || want+=(docker-compose)
  docker buildx version >/dev/null 2>&1 || want+=(docker-buildx)
  [ ${#want[@]} = 0 ] && return 0
  log "installing ${want[*]} (Debian trixie packages)"
  local d=$CACHE/apt-trixie
  mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$d/debs"
  echo "deb ${MIRROR} trixie main" >"$d/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$d/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$d/lists" -o "Dir::Cache=$d/cache" -q)
  {
    apt-get "${opts[@]}" update &&
      (cd "$d/debs" && rm -f ./*.deb && apt-get "${opts[@]}" download "${want[@]}") &&
      dpkg -i "$d"/debs/*.deb
  } >"$OUT/apt-plugins.log" 2>&1 || {
    tail -n 5 "$OUT/apt-plugins.log" >&2
    return 1
  }
  compose_ok
}

start_dockerd
ensure_plugins || engine_unavailable "could not install Compose >= 2.24 / buildx from Debian (see $OUT/apt-plugins.log)"
export DOCKER_BUILDKIT=1

# --- 2. base image and the stand-ins for Docker Hub's redis and prometheus ---------------
make_base() {
  docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
  local tar=$CACHE/base-$BASE_VERSION.tar
  if [ ! -s "$tar" ]; then
    command -v debootstrap >/dev/null 2>&1 ||
      (apt-get update -q && apt-get install -y -q debootstrap) >"$OUT/apt-debootstrap.log" 2>&1
    local rootfs=$CACHE/rootfs-$BASE_VERSION.tmp
    rm -rf "$rootfs"
    log "debootstrap $SUITE (python3, python3-venv) into $rootfs: a few minutes"
    nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      "$SUITE" "$rootfs" "$MIRROR" >"$OUT/debootstrap.log" 2>&1 || {
      tail -n 20 "$OUT/debootstrap.log" >&2
      return 1
    }
    printf 'deb %s %s main\ndeb %s %s-updates main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" \
      >"$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb \
      "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/* "$rootfs"/etc/hostname
    : >"$rootfs/etc/resolv.conf"
    tar --numeric-owner -C "$rootfs" -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
    rm -rf "$rootfs"
  fi
  log "docker import $tar -> $BASE_IMAGE"
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' \
    "$tar" "$BASE_IMAGE" >/dev/null
}

make_base || engine_unavailable "could not make the Debian base image (see $OUT/debootstrap.log)"
for svc in redis prometheus; do
  [ $MODE = gpu ] && break
  tag=$REDIS_IMAGE
  [ $svc = prometheus ] && tag=$PROMETHEUS_IMAGE
  log "image $tag (Debian's $svc on the base)"
  nice -n 10 docker build -q --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    -f "deploy/smoke/$svc.Dockerfile" -t "$tag" deploy/smoke >>"$OUT/build-$svc.log" 2>&1 || {
    tail -n 20 "$OUT/build-$svc.log" >&2
    exit 1
  }
done

# --- 3. the real Dockerfile, CPU variant ------------------------------------------------
PIP_DIR=$(mktemp -d)
PIP_PID=
WORK=$(mktemp -d)
cleanup() {
  local rc=$?
  if [ -n "${COMPOSE_UP:-}" ]; then
    "${COMPOSE[@]}" logs --no-color --timestamps >"$OUT/compose.log" 2>&1 || true
    if [ "${DEPLOY_SMOKE_KEEP:-0}" = 1 ]; then
      log "DEPLOY_SMOKE_KEEP=1: the stack stays up (docker compose -p $PROJECT down -v)"
    else
      log "removing compose project $PROJECT (containers, networks, volumes)"
      "${COMPOSE[@]}" --profile grafana down --volumes --remove-orphans --timeout 20 \
        >>"$OUT/compose-down.log" 2>&1 || true
    fi
  fi
  [ -n "$PIP_PID" ] && kill "$PIP_PID" 2>/dev/null || true
  rm -rf "$PIP_DIR" "$WORK"
  if [ $rc = 0 ]; then log "PASSED (results: $OUT/results.json)"; else log "FAILED ($rc): logs in $OUT"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

drop=()
[ $MODE = gpu ] && drop=(--drop find-links)
python3 deploy/smoke/pip_settings.py "$PIP_DIR" "${drop[@]}" &
PIP_PID=$!
for _ in $(seq 50); do [ -s "$PIP_DIR/ready" ] && break; sleep 0.2; done
secrets=(--secret "id=pip.conf,src=$PIP_DIR/pip.conf")
cert=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["cert"] or "")' "$PIP_DIR/ready")
[ -n "$cert" ] && secrets+=(--secret "id=pip-ca,src=$cert")

if [ $MODE = gpu ]; then
  GPU_IMAGE=softvq-serve:smoke-gpu
  log "docker build (VARIANT=gpu, os-gpu stage on $BASE_IMAGE, torch from PyPI) -> $GPU_IMAGE"
  t0=$(date +%s)
  nice -n 10 docker build --network host --progress plain \
    --build-arg VARIANT=gpu \
    --build-arg "CUDA_IMAGE=$BASE_IMAGE" \
    --build-arg "TORCH_INDEX_GPU=${DEPLOY_SMOKE_TORCH_INDEX:-https://pypi.org/simple}" \
    "${secrets[@]}" -t "$GPU_IMAGE" . >"$OUT/build.log" 2>&1 || {
    tail -n 40 "$OUT/build.log" >&2
    exit 1
  }
  build_s=$(($(date +%s) - t0))
  size=$(docker image inspect -f '{{.Size}}' "$GPU_IMAGE")
  log "built in ${build_s}s, $((size / 1000000)) MB; checking what it holds"
  docker run --rm --network none --entrypoint python3 "$GPU_IMAGE" -c '
import json, os, shutil, subprocess, sysconfig
import torch, onnxruntime, triton, pynvml
import service.cli, model
out = {
    "uid": os.getuid(),
    "torch": torch.__version__, "torch_cuda": torch.version.cuda,
    "cuda_available": torch.cuda.is_available(),
    "onnxruntime": onnxruntime.__version__,
    "onnxruntime_providers": onnxruntime.get_available_providers(),
    "triton": triton.__version__,
    "cache_dir_writable": os.access(os.path.expanduser("~/.cache/softvq"), os.W_OK),
    "c_compiler": shutil.which("gcc") or shutil.which("cc"),
    "python_headers": os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"),
    "softvq_help": subprocess.run(["softvq", "--help"], capture_output=True).returncode,
    "liveness_probe_no_worker": subprocess.run(["python3", "-m", "service.liveness"], capture_output=True).returncode,
}
print(json.dumps(out))
' >"$OUT/image-check.json" 2>"$OUT/image-check.err" || {
    cat "$OUT/image-check.err" >&2
    exit 1
  }
  python3 - "$OUT" "$build_s" "$size" <<'PY'
import json, sys
out, build_s, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = json.load(open(f"{out}/image-check.json"))
assert held["uid"] == 10001 and held["torch_cuda"], held
assert "CUDAExecutionProvider" in held["onnxruntime_providers"], held
assert held["cache_dir_writable"] and held["softvq_help"] == 0, held
assert held["liveness_probe_no_worker"] == 1, held
assert held["c_compiler"] and held["python_headers"], held  # triton builds its launcher
res = {"build_seconds": build_s, "image_size_mb": round(size / 1e6), "image": held, "passed": True}
open(f"{out}/results.json", "w").write(json.dumps(res, indent=1))
print(json.dumps(res))
PY
  if [ "${DEPLOY_SMOKE_KEEP:-0}" != 1 ]; then
    docker image rm "$GPU_IMAGE" >/dev/null
    # and its build cache (~6 GB of CUDA wheels), keeping the most recently used layers
    docker builder prune -f --keep-storage 8GB >/dev/null 2>&1 || true
  fi
  exit 0
fi

# torch for the CPU variant: the CPU wheel wherever this host's pip finds it (find-links);
# PyPI as the index for its dependencies. Elsewhere the Dockerfile's default index applies.
TORCH_INDEX=${DEPLOY_SMOKE_TORCH_INDEX:-https://pypi.org/simple}
log "docker build (VARIANT=cpu, base $BASE_IMAGE) -> $IMAGE"
old_id=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
t0=$(date +%s)
nice -n 10 docker build --network host --progress plain \
  --build-arg VARIANT=cpu \
  --build-arg "PYTHON_IMAGE=$BASE_IMAGE" \
  --build-arg "TORCH_INDEX_CPU=$TORCH_INDEX" \
  "${secrets[@]}" -t "$IMAGE" . >"$OUT/build.log" 2>&1 || {
  tail -n 40 "$OUT/build.log" >&2
  exit 1
}
build_s=$(($(date +%s) - t0))
# the previous build of this tag, now untagged (1.3 GB each): not left to pile up
if [ -n "$old_id" ] && [ "$old_id" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]; then
  docker image rm "$old_id" >/dev/null 2>&1 || true
fi
kill "$PIP_PID" 2>/dev/null || true
PIP_PID=
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
log "built in ${build_s}s, $((size / 1000000)) MB"
# no pip settings in the image: not in its history or environment, not in its files
pip_port=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["port"] or "none")' "$PIP_DIR/ready")
if { docker history --no-trunc "$IMAGE"; docker image inspect -f '{{json .Config.Env}}' "$IMAGE"; } |
  grep -q -e "127.0.0.1:$pip_port" -e pip.conf -e pip-ca -e PIP_ ||
  docker run --rm --entrypoint sh "$IMAGE" -c 'test -e /run/secrets/pip.conf || test -e /etc/pip.conf'; then
  echo "pip build settings leaked into $IMAGE" >&2
  exit 1
fi

# --- 4. the stack -------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
mkdir -p "$WORK/weights" # empty: the demo weights inside the image are served
export DEPLOY_IMAGE=$IMAGE DEPLOY_VARIANT=cpu WEIGHTS_DIR=$WORK/weights
export API_PORT=${DEPLOY_SMOKE_API_PORT:-$(free_port)}
export PROMETHEUS_PORT=${DEPLOY_SMOKE_PROMETHEUS_PORT:-$(free_port)}
export SMOKE_REDIS_IMAGE=$REDIS_IMAGE SMOKE_PROMETHEUS_IMAGE=$PROMETHEUS_IMAGE
COMPOSE=(docker compose -p "$PROJECT" -f docker-compose.yml -f deploy/compose.cpu.yml
  -f deploy/smoke/compose.smoke.yml)
# a previous run that was killed before its trap ran
"${COMPOSE[@]}" --profile grafana down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
COMPOSE_UP=1
log "docker compose up (2 workers): API on 127.0.0.1:$API_PORT, Prometheus on 127.0.0.1:$PROMETHEUS_PORT"
up_t0=$(date +%s.%N)
"${COMPOSE[@]}" up -d --no-build --scale worker=2 >"$OUT/compose-up.log" 2>&1 || {
  cat "$OUT/compose-up.log" >&2
  exit 1
}

# --- 5. the checks ------------------------------------------------------------------------
python3 deploy/smoke/check.py \
  --project "$PROJECT" \
  --api "http://127.0.0.1:$API_PORT" \
  --prometheus "http://127.0.0.1:$PROMETHEUS_PORT" \
  --up-started "$up_t0" \
  --image "$IMAGE" --image-size "$size" --build-seconds "$build_s" \
  --results "$OUT/results.json" \
  -- "${COMPOSE[@]}"
