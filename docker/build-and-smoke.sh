#!/usr/bin/env bash
# Build the bfpack image locally with podman and smoke-test it, without any image registry:
#   1. base:  make debian:bookworm-slim with debootstrap (once; skipped when the tag exists)
#   2. build: podman build docker/Dockerfile from a small temporary context (--pull=never)
#   3. smoke: run `bfpack demo` in the container with a host temp dir mounted as /app/out,
#             then check from the host that sequences/documents/stats are Delta tables with
#             rows and that the run's audit passed.
# Exits non-zero if any step fails. Run as root on Debian/Ubuntu (apt installs podman and
# debootstrap when missing).
#
#   docker/build-and-smoke.sh                 # IMAGE=bfpack:local
#   IMAGE=bfpack:test KEEP_OUT=1 docker/build-and-smoke.sh
#   REBUILD_BASE=1 docker/build-and-smoke.sh  # remake the debootstrap base
#   NO_CACHE=1 docker/build-and-smoke.sh      # rebuild every layer of the image
#
# Settings (environment):
#   IMAGE          the tag to build (bfpack:local)
#   BASE           the base image's tag (localhost/debian:bookworm-slim: podman resolves the
#                  Dockerfile's short name `debian:bookworm-slim` to localhost/ first, so no
#                  registry is named or asked); SUITE (bookworm) and MIRROR for debootstrap;
#                  REBUILD_BASE=1 remakes it
#   MIRROR         the Debian archive debootstrap installs from (default: the one this machine's
#                  own apt sources use for SUITE, from /etc/apt/sources.list.d/*.sources or
#                  /etc/apt/sources.list; no mirror is written into the project)
#   NO_CACHE=1     build without podman's layer cache
#   PYTHON         python with deltalake and pyarrow for the checks (default: the repo's .venv,
#                  else python3; without deltalake, the checks run in the image instead)
#   PIP_CERT_FILE  CA bundle handed to pip in the build as a secret (default: the host's bundle,
#                  so that a TLS-intercepting proxy's CA works in the build; empty: none)
#   KEEP_OUT=1     keep the temporary directory with the demo's tables
#   PODMAN_NETWORK network for build and run (host)
#   RUNTIME        OCI runtime (default: podman's; runc where cgroups are hybrid v1+v2)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${IMAGE:-bfpack:local}"
BASE="${BASE:-localhost/debian:bookworm-slim}"
SUITE="${SUITE:-bookworm}"

# The Debian archive of this machine's apt sources that serves $SUITE (not its -security or
# -updates suites): deb822 .sources files first, then one-line sources.list entries.
apt_mirror() {
    local f uris suites
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r "$f" ]] || continue
        # one stanza per paragraph: print its URIs when its Suites hold $SUITE itself
        awk -v suite="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
            { uris = ""; ok = 0
              for (i = 1; i <= NF; i++) {
                if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); uris = $i }
                if ($i ~ /^Suites:/) { n = split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == suite) ok = 1 }
              }
              if (ok && uris != "") { split(uris, u, /[ \t]+/); print u[1]; exit } }' "$f"
    done | head -n 1
    if [[ -r /etc/apt/sources.list ]]; then
        awk -v suite="$SUITE" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                                             if ($(i + 1) == suite) { print $i; exit } }' /etc/apt/sources.list
    fi
}
MIRROR="${MIRROR:-$(apt_mirror | head -n 1)}"
if [[ -z "$MIRROR" ]]; then
    echo "build-and-smoke: no apt source for Debian $SUITE on this machine; set MIRROR to a Debian archive" >&2
    exit 2
fi
PODMAN_NETWORK="${PODMAN_NETWORK:-host}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -z "${PIP_CERT_FILE+set}" ]]; then
    PIP_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
    [[ -s "$PIP_CERT_FILE" ]] || PIP_CERT_FILE=
fi

# Podman settings that also work inside a sandbox (a VM or container without systemd, with
# hybrid cgroups v1+v2 and capped rlimits); on an ordinary host they change nothing of note:
# - cgroupfs instead of systemd, events to a file instead of journald;
# - runc where cgroups are hybrid (crun 1.8 refuses: "cgroups in hybrid mode not supported");
# - ulimits no higher than this process's hard limits (podman's defaults for root, nofile
#   1048576 and nproc 4194304, fail with "setrlimit ...: Operation not permitted" without
#   CAP_SYS_RESOURCE); nproc also at most kernel.pid_max.
podman_cmd=(podman --cgroup-manager=cgroupfs --events-backend=file)
if [[ -z "${RUNTIME:-}" ]] && mountpoint -q /sys/fs/cgroup/unified 2>/dev/null; then RUNTIME=runc; fi
if [[ -n "${RUNTIME:-}" ]]; then podman_cmd+=(--runtime "$RUNTIME"); fi
podman() { command "${podman_cmd[@]}" "$@"; }
nofile="$(ulimit -Hn)"; nproc="$(ulimit -Hu)"
[[ "$nofile" == unlimited ]] && nofile=1048576
pid_max="$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo 32768)"
if [[ "$nproc" == unlimited ]] || (( nproc > pid_max )); then nproc="$pid_max"; fi
ulimits=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'build-and-smoke: FAILED: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

work="$(mktemp -d -t bfpack-smoke.XXXXXX)"
cleanup() {
    local rc=$?
    if [[ "${KEEP_OUT:-0}" == 1 ]]; then
        echo "kept $work" >&2
    else
        rm -rf "$work"
    fi
    if (( rc != 0 )); then echo "build-and-smoke: exit $rc" >&2; fi
}
trap cleanup EXIT

t_start=$(now)

# --- 0. tools ----------------------------------------------------------------------------
need=()
type -P podman >/dev/null || need+=(podman)
type -P debootstrap >/dev/null || need+=(debootstrap)
if [[ -n "${RUNTIME:-}" ]] && ! type -P "$RUNTIME" >/dev/null; then need+=("$RUNTIME"); fi
if (( ${#need[@]} )); then
    log "installing ${need[*]}"
    [[ $(id -u) == 0 ]] || die "need root to apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
t_tools=$(now)

# --- 1. base -----------------------------------------------------------------------------
base_status="cached"
if [[ "${REBUILD_BASE:-0}" == 1 ]] || ! podman image exists "$BASE"; then
    base_status="made"
    log "base: debootstrap --variant=minbase $SUITE -> $BASE"
    [[ $(id -u) == 0 ]] || die "debootstrap needs root"
    root="$work/rootfs"
    debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" > "$work/debootstrap.log" 2>&1 \
        || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap"; }
    # Make it like the official slim image: the same apt sources (with updates and security),
    # no docs, man pages or translations from later installs, apt caches cleaned after installs.
    rm -f "$root/etc/apt/sources.list"
    cat > "$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    cat > "$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' > "$root/etc/apt/apt.conf.d/docker-no-languages"
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
    rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
           "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
           "$root"/var/log/* "$root"/tmp/* "$root"/root/.bash_history
    : > "$root/etc/hostname"
    : > "$root/etc/resolv.conf"
    if podman image exists "$BASE"; then podman rmi -f "$BASE" >/dev/null; fi
    tar --numeric-owner --xattrs -C "$root" -c . \
        | podman import --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            - "$BASE" >/dev/null
    rm -rf "$root"
    podman image exists "$BASE" || die "base image $BASE was not created"
fi
t_base=$(now)
log "base: $BASE ($base_status, $(secs "$t_tools" "$t_base")s)"

# --- 2. build ----------------------------------------------------------------------------
# A temporary context with only what the image needs: the repo root holds .venv and caches.
ctx="$work/context"
mkdir -p "$ctx/docker"
tar -C "$repo" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' -cf - \
    pyproject.toml README.md bfpack_spark jobs conf | tar -C "$ctx" -xf -
cp "$repo/docker/Dockerfile" "$ctx/docker/Dockerfile"
build_args=(--pull=never --network="$PODMAN_NETWORK" "${ulimits[@]}" -f "$ctx/docker/Dockerfile" -t "$IMAGE")
if [[ -n "$PIP_CERT_FILE" ]]; then build_args+=(--secret "id=pip_cert,src=$PIP_CERT_FILE"); fi
if [[ "${NO_CACHE:-0}" == 1 ]]; then build_args+=(--no-cache); fi
log "build: podman build ${build_args[*]} $ctx ($(du -sh "$ctx" | cut -f1) context)"
old_id="$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
podman build "${build_args[@]}" "$ctx" || die "podman build"
# The image this tag named before, now untagged: remove it (not other dangling images).
if [[ -n "$old_id" && "$old_id" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]]; then
    podman rmi "$old_id" >/dev/null 2>&1 || true
fi
t_build=$(now)
size="$(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
log "build: $IMAGE, $size ($(secs "$t_base" "$t_build")s)"

# --- 3. smoke ----------------------------------------------------------------------------
out="$work/out"
mkdir -p "$out"
log "smoke: podman run --rm -v $out:/app/out $IMAGE demo"
podman run --rm --network="$PODMAN_NETWORK" "${ulimits[@]}" -v "$out:/app/out" "$IMAGE" demo \
    || die "bfpack demo in the container"
podman run --rm --network=none "${ulimits[@]}" --entrypoint sh "$IMAGE" -c \
    'test -x "$JAVA_HOME/bin/java" && echo "JAVA_HOME=$JAVA_HOME -> $(readlink -f "$JAVA_HOME")"' \
    || die "JAVA_HOME in the image"

if "$PYTHON" -c "import deltalake, pyarrow.dataset" 2>/dev/null; then
    log "smoke: checking the Delta tables in $out/demo from the host ($PYTHON)"
    check=("$PYTHON" - "$out/demo")
else
    log "smoke: $PYTHON has no deltalake; checking the Delta tables in $out/demo with the image's python"
    check=(podman run --rm -i --network=none "${ulimits[@]}" -v "$out:/check:ro" --entrypoint python
           "$IMAGE" - /check/demo)
fi
"${check[@]}" <<'EOF' || die "the demo's tables"
import sys

import pyarrow.dataset as ds
from deltalake import DeltaTable

root = sys.argv[1]
rows = {}
for name in ("sequences", "documents", "stats"):
    uri = f"{root}/{name}"
    if not DeltaTable.is_deltatable(uri):
        sys.exit(f"{uri} is not a Delta table")
    files = DeltaTable(uri).file_uris()
    if not files:
        sys.exit(f"{uri} has no data files")
    table = ds.dataset(files, format="parquet").to_table()
    if table.num_rows == 0:
        sys.exit(f"{uri} has no rows")
    rows[name] = table
    print(f"  {name}: version {DeltaTable(uri).version()}, {len(files)} files, {table.num_rows:,} rows")
stats = rows["stats"].to_pylist()
if not all(row.get("audit_passed") is True for row in stats):
    sys.exit(f"audit_passed is not true in every stats row: {[row.get('audit_passed') for row in stats]}")
print(f"  stats: audit_passed true ({len(stats)} run(s))")
EOF
t_smoke=$(now)

log "PASSED: $IMAGE ($size)"
printf '  %-7s %7ss\n' tools "$(secs "$t_start" "$t_tools")" \
    base "$(secs "$t_tools" "$t_base")" \
    build "$(secs "$t_base" "$t_build")" \
    smoke "$(secs "$t_build" "$t_smoke")" \
    total "$(secs "$t_start" "$t_smoke")"
