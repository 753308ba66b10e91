#!/usr/bin/env bash
# Builds the OCI image with `bentoml containerize --backend podman`, runs it and checks it over HTTP (probe.py):
# /health, wav and flac decoded, errors in the project's shape, the API key, a SIGTERM that drains the request
# in flight and exits 0 within the stop timeout, and a missing model that stops the container (exit != 0).
# The API-key container runs as deploy/kubernetes/deployment.yaml runs the image: a read-only root filesystem, no
# capabilities, no privilege escalation, the manifest's env, and a tmpfs where it mounts an emptyDir.
# Run as root from anywhere: `bash deploy/container/check.sh`.
# Settings (environment): PYTHON (a venv with the project and its test extras; default .venv/bin/python),
# IMAGE (default stable-audio-bento:check), STOP_TIMEOUT_S (120).
# The tiny model is imported into a scratch model store, so the Bento and the image carry it: the containers run
# with no model setting and no network (--network none), and the probes run inside them.
# Cached between runs: the base image and podman's build layers; the Bento is rebuilt in a scratch BENTOML_HOME.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
PROBE_PY=$REPO/deploy/container/probe.py
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
IMAGE=${IMAGE:-stable-audio-bento:check}
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-120}
BASE_IMAGE=docker.io/library/python:3.11-slim  # what BentoML's generated Dockerfile starts FROM
MODEL=tiny  # imported before the build; /health must name it
STARTED=$(date +%s)
WORK=$(mktemp -d)
CONTAINERS=()

say() { printf '==> %s\n' "$*"; }
cleanup() {
  local name
  for name in "${CONTAINERS[@]}"; do podman rm -f -t 0 "$name" >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "check.sh: run as root (rootful podman, apt-get, debootstrap)" >&2; exit 1; }

install_missing() {  # TOOL=PACKAGE ...: installs the packages whose tool is not on PATH
  local pair missing=()
  for pair in "$@"; do command -v "${pair%%=*}" >/dev/null || missing+=("${pair#*=}"); done
  [ ${#missing[@]} -eq 0 ] && return
  say "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

setup_podman() {
  install_missing podman=podman runc=runc
  # crun, podman's default runtime, cannot set RLIMIT_NOFILE or use hybrid cgroups on these machines; runc can.
  if [ ! -e /etc/containers/containers.conf ]; then
    say "writing /etc/containers/containers.conf (runc, cgroupfs, no default ulimits)"
    mkdir -p /etc/containers
    printf '[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\n' \
      > /etc/containers/containers.conf
  fi
}

# A stand-in for python:3.11-slim where no registry can be reached: Debian bookworm's python3 is 3.11.
build_base_image() {
  if podman image exists "$BASE_IMAGE"; then say "base image $BASE_IMAGE: present"; return; fi
  if timeout 90 podman pull -q "$BASE_IMAGE" >/dev/null 2>&1; then say "base image $BASE_IMAGE: pulled"; return; fi
  say "base image $BASE_IMAGE cannot be pulled: building a STAND-IN from Debian bookworm with debootstrap"
  install_missing debootstrap=debootstrap
  local root=$WORK/rootfs
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$root" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  rm -f "$root"/usr/lib/python3.11/EXTERNALLY-MANAGED  # the Dockerfile pip-installs uv into the system Python
  ln -sf python3 "$root/usr/bin/python"
  # Extra CAs of this machine (e.g. a TLS-inspecting egress) so that pip and apt work inside the build.
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  fi
  chroot "$root" update-ca-certificates >/dev/null
  tar -C "$root" -c . | podman import -q --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' - "$BASE_IMAGE" >/dev/null
  say "stand-in base image $BASE_IMAGE: $(podman image inspect -f '{{.Size}}' "$BASE_IMAGE" | numfmt --to=si)B"
}

build_image() {
  export BENTOML_HOME=$WORK/bentoml BENTOML_DO_NOT_TRACK=True
  local previous tag began
  previous=$(podman image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
  began=$(date +%s)
  "$PYTHON" -m stable_audio_bento.model_import "$MODEL"
  # `bentoml build` locks the packages against PyPI, the image's uv installs them from PyPI again minutes later;
  # while a release is being published or withdrawn, PyPI's views of it can disagree for a while (seen: a version
  # locked that the image's uv was told does not exist). Only that failure is worth locking again for.
  local attempt
  for attempt in 1 2 3; do
    tag=$("$PYTHON" -m bentoml build "$REPO" --output tag | sed -n 's/^__tag__://p')
    say "built Bento $tag"
    "$PYTHON" -m bentoml containerize --backend podman "$tag" -t "$IMAGE" >"$WORK/containerize.log" 2>&1 && break
    if [ "$attempt" = 3 ] || ! grep -q "No solution found when resolving dependencies" "$WORK/containerize.log"; then
      tail -40 "$WORK/containerize.log"
      exit 1
    fi
    grep -m1 "cause:" "$WORK/containerize.log" || true
    say "the image's install found no version the lock pinned (PyPI's views disagree): locking again in 60 s"
    sleep 60
  done
  BUILD_S=$(($(date +%s) - began))
  local id
  id=$(podman image inspect -f '{{.Id}}' "$IMAGE")
  # The last run's image differs in its final layer only; drop it so that runs do not pile up.
  if [ -n "$previous" ] && [ "$previous" != "$id" ]; then podman rmi "$previous" >/dev/null 2>&1 || true; fi
  IMAGE_BYTES=$(podman image inspect -f '{{.Size}}' "$IMAGE")
  say "image $IMAGE: $(numfmt --to=si "$IMAGE_BYTES")B, bentoml build + containerize in ${BUILD_S} s"
}

# The containers have no network, so every HTTP exchange runs in a throwaway container of the same image that joins
# the checked one's network namespace (not `podman exec`: that process would die with the container it checks).
probe() {  # NAME CHECK [ARGS]: see probe.py
  podman run --rm -i --network "container:$1" "$IMAGE" python - "$2" http://127.0.0.1:8091 "${@:3}" <"$PROBE_PY"
}

start() {  # NAME [podman run options]: runs the image and waits for /health; sets HEALTHY_S
  local name=$1 began health rc
  shift
  began=$(date +%s%3N)
  CONTAINERS+=("$name")
  podman run -d --name "$name" --network none "$@" "$IMAGE" >/dev/null
  until health=$(probe "$name" health "$MODEL"); do
    rc=$?
    if [ "$rc" != 2 ] || [ "$(podman inspect -f '{{.State.Running}}' "$name")" != true ] \
      || (( $(date +%s%3N) - began > 300000 )); then
      podman logs --tail 40 "$name"
      echo "check.sh: $name never became healthy" >&2
      exit 1
    fi
  done
  local ms=$(($(date +%s%3N) - began))
  HEALTHY_S=$((ms / 1000)).$((ms % 1000 / 100))
  say "$name healthy after $HEALTHY_S s: $health"
}

# SIGTERM with a generation in flight: it finishes, new work gets 503, the container exits 0 within the timeout.
check_drain() {
  local name=$1 began stopped_s code
  : >"$WORK/drain.out"
  probe "$name" drain >"$WORK/drain.out" 2>&1 &
  local prober=$!
  until grep -q '^in flight' "$WORK/drain.out"; do
    kill -0 "$prober" 2>/dev/null || { cat "$WORK/drain.out"; exit 1; }
    sleep 0.1
  done
  began=$(date +%s)
  podman stop -t "$STOP_TIMEOUT_S" "$name" >/dev/null
  stopped_s=$(($(date +%s) - began))
  wait "$prober" || { cat "$WORK/drain.out"; exit 1; }
  cat "$WORK/drain.out"
  code=$(podman inspect -f '{{.State.ExitCode}}' "$name")
  # Read from a file: `podman logs | grep -q` fails under pipefail whenever grep exits on its match before podman
  # has written the rest (SIGPIPE, status 141), which a loaded machine makes likely (a CI run, 2026-11-27).
  podman logs "$name" >"$WORK/$name.log" 2>&1
  grep -q 'draining: no new requests' "$WORK/$name.log" \
    || { tail -n 40 "$WORK/$name.log"; echo "check.sh: no drain in the log" >&2; exit 1; }
  if [ "$code" != 0 ] || [ "$stopped_s" -ge "$STOP_TIMEOUT_S" ]; then
    podman logs --tail 40 "$name"
    echo "check.sh: after SIGTERM $name exited $code in ${stopped_s} s (stop timeout ${STOP_TIMEOUT_S} s)" >&2
    exit 1
  fi
  say "SIGTERM: drained and exited 0 in ${stopped_s} s (stop timeout ${STOP_TIMEOUT_S} s)"
}

setup_podman
build_base_image
build_image

start sab-check
FIRST_HEALTHY_S=$HEALTHY_S
probe sab-check serving
check_drain sab-check

# A model that cannot be loaded stops the container with exit != 0 and one message, instead of restarting.
check_fail_fast() {
  local name=sab-check-fail began code stopped_s
  CONTAINERS+=("$name")
  began=$(date +%s)
  podman run -d --name "$name" --network none -e STABLE_AUDIO_MODEL=/models/missing "$IMAGE" >/dev/null
  code=$(timeout 180 podman wait "$name") || { podman logs --tail 40 "$name"; echo "check.sh: $name never stopped" >&2; exit 1; }
  stopped_s=$(($(date +%s) - began))
  local messages
  messages=$(podman logs "$name" 2>&1 | grep -c "cannot serve STABLE_AUDIO_MODEL='/models/missing'" || true)
  if [ "$code" = 0 ] || [ "$messages" != 1 ]; then
    podman logs --tail 40 "$name"
    echo "check.sh: with a missing model $name exited $code after ${stopped_s} s, the message logged $messages times" >&2
    exit 1
  fi
  FAIL_S=$stopped_s
  say "missing model: exited $code after ${stopped_s} s with one message"
}

check_fail_fast

# As deployment.yaml's securityContext, env and emptyDirs (tests/test_deploy.py checks that these match it). A tmpfs
# stands in for an emptyDir: exec (torch.compile loads the kernels it builds from /tmp) and writable by anyone.
READ_ONLY=(--read-only --read-only-tmpfs=false --user 1034:1034 --cap-drop=ALL --security-opt no-new-privileges
  --tmpfs /tmp:rw,exec,mode=1777 --tmpfs /cache:rw,exec,mode=1777
  -e BENTOML_HOME=/tmp/bentoml -e HOME=/cache -e HF_HOME=/cache/huggingface)
KEY=check-$RANDOM$RANDOM
start sab-check-key "${READ_ONLY[@]}" -e STABLE_AUDIO_API_KEY="$KEY"
probe sab-check-key auth "$KEY"  # generates a WAV with the key
say "read-only root filesystem (as deployment.yaml): healthy after $HEALTHY_S s, generated with the API key"

say "OK: image $(numfmt --to=si "$IMAGE_BYTES")B, build ${BUILD_S} s, healthy after $FIRST_HEALTHY_S s, \
missing model stopped in $FAIL_S s, read-only root passed, whole check $(($(date +%s) - STARTED)) s"
