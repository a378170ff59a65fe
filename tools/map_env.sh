#!/usr/bin/env bash
# Copyright (c) LCA-DB MONAI plugin contributors
# Licensed under the Apache License, Version 2.0 (the "License"); see the repository's LICENSE.
#
# What `monai-deploy package` (holoscan-cli 4.2.0) needs on a Debian 12 host without systemd and with no network
# but the package registries, installed and started as root:
#   install  Debian docker.io, docker-registry and debootstrap; docker-buildx (not in Debian 12) from Debian 13's
#            archive, its package verified by apt with Debian's keyring (libc6 >= 2.34 is its only dependency)
#   start    dockerd (overlay2, its default bridge with NAT so that builds reach the package registries, published
#            ports on 127.0.0.1 only), a registry on 127.0.0.1 for the MAP's base image (the packager pulls it),
#            and the docker context `holoscan_app_builder` (the builder name the packager asks buildx for)
#   stop     what `start` started (never a daemon it found running)
#   status   one line per part, and exit status 1 when one is missing
# Logs and pid files: /var/log/lcadb-map, /run/lcadb-map. LCADB_MAP_REGISTRY (127.0.0.1:5000) sets the registry.
set -euo pipefail

REGISTRY=${LCADB_MAP_REGISTRY:-127.0.0.1:5000}
STATE_DIR=/var/lib/lcadb-map
LOG_DIR=/var/log/lcadb-map
RUN_DIR=/run/lcadb-map
BUILDER_CONTEXT=holoscan_app_builder
DEBIAN_PACKAGES=(docker.io docker-registry debootstrap)
BUILDX_SUITE=trixie

say() { echo "[map-env] $*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    say "must run as root to $1 (apt-get, dockerd); as root: bash tools/map_env.sh $1"
    exit 1
  fi
}

docker_up() { docker info >/dev/null 2>&1; }
buildx_ok() { docker buildx version >/dev/null 2>&1; }
registry_up() { curl -fsS -o /dev/null --max-time 2 "http://$REGISTRY/v2/" 2>/dev/null; }
context_ok() { docker context inspect "$BUILDER_CONTEXT" >/dev/null 2>&1; }

install_buildx() {
  # A private apt state (lists, cache) for Debian 13: the host's own sources stay as they are.
  local apt_dir
  apt_dir=$(mktemp -d /tmp/lcadb-map-apt.XXXXXX)
  mkdir -p "$apt_dir"/lists/partial "$apt_dir"/cache/archives/partial
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $BUILDX_SUITE main" \
    > "$apt_dir/sources.list"
  local options=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/nonexistent
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root)
  say "installing docker-buildx from Debian $BUILDX_SUITE"
  apt-get "${options[@]}" update -qq
  apt-get "${options[@]}" install -y -qq --no-install-recommends --download-only docker-buildx >/dev/null
  dpkg -i "$apt_dir"/cache/archives/docker-buildx_*.deb >/dev/null
  rm -rf "$apt_dir"
}

install() {
  need_root install
  local missing=()
  for package in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" curl >/dev/null
    # Their packages may start system services (a registry on all interfaces): ours are started by `start`.
    for service in docker docker-registry; do (service "$service" stop || true) >/dev/null 2>&1; done
  fi
  buildx_ok || install_buildx
}

start() {
  need_root start
  mkdir -p "$STATE_DIR/registry" "$LOG_DIR" "$RUN_DIR"
  if ! docker_up; then
    say "starting dockerd (log $LOG_DIR/dockerd.log)"
    setsid dockerd --host unix:///var/run/docker.sock --ip 127.0.0.1 --pidfile "$RUN_DIR/dockerd.pid" \
      >"$LOG_DIR/dockerd.log" 2>&1 < /dev/null &
    for _ in $(seq 60); do docker_up && break; sleep 1; done
    docker_up || { say "dockerd did not start: see $LOG_DIR/dockerd.log"; tail -5 "$LOG_DIR/dockerd.log" >&2; exit 1; }
    touch "$RUN_DIR/dockerd.ours"
  fi
  if ! registry_up; then
    say "starting a registry on $REGISTRY (log $LOG_DIR/registry.log, storage $STATE_DIR/registry)"
    cat > "$RUN_DIR/registry.yml" <<EOF
version: 0.1
storage:
  filesystem:
    rootdirectory: $STATE_DIR/registry
  delete:
    enabled: true
http:
  addr: $REGISTRY
EOF
    setsid docker-registry serve "$RUN_DIR/registry.yml" >"$LOG_DIR/registry.log" 2>&1 < /dev/null &
    echo $! > "$RUN_DIR/registry.pid"
    for _ in $(seq 30); do registry_up && break; sleep 1; done
    registry_up || { say "the registry did not start: see $LOG_DIR/registry.log"; exit 1; }
  fi
  # buildx lists docker contexts as builders (docker driver): the packager then builds with the daemon itself,
  # instead of creating a docker-container builder whose BuildKit image would come from Docker Hub.
  context_ok || docker context create "$BUILDER_CONTEXT" --docker host=unix:///var/run/docker.sock >/dev/null
}

stop_pid() {
  local name=$1 file=$2 pid
  pid=$(cat "$file" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    say "stopping $name (pid $pid)"
    kill "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  fi
  rm -f "$file"
}

stop() {
  stop_pid registry "$RUN_DIR/registry.pid"
  if [ -f "$RUN_DIR/dockerd.ours" ]; then
    stop_pid dockerd "$RUN_DIR/dockerd.pid"
    rm -f "$RUN_DIR/dockerd.ours"
  fi
}

status() {
  local ok=0
  command -v docker >/dev/null && say "docker CLI: $(command -v docker)" || { say "docker CLI: missing (apt-get install docker.io)"; ok=1; }
  command -v dockerd >/dev/null && say "dockerd: installed" || { say "dockerd: missing (apt-get install docker.io)"; ok=1; }
  command -v docker-registry >/dev/null && say "docker-registry: installed" || { say "docker-registry: missing"; ok=1; }
  command -v debootstrap >/dev/null && say "debootstrap: installed" || { say "debootstrap: missing"; ok=1; }
  buildx_ok && say "buildx: $(docker buildx version)" || { say "buildx: missing"; ok=1; }
  docker_up && say "Docker daemon: running" || { say "Docker daemon: not reachable"; ok=1; }
  registry_up && say "registry: $REGISTRY" || { say "registry: nothing answers on $REGISTRY"; ok=1; }
  context_ok && say "docker context $BUILDER_CONTEXT: present" || { say "docker context $BUILDER_CONTEXT: missing"; ok=1; }
  return $ok
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  up) install; start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|up|stop|status" >&2; exit 2 ;;
esac
