#!/usr/bin/env bash
# Node start-up hook for ray-model-prefetch: start Ray on this node with its cache directory declared, then hand
# the node's agent (and the cluster's controller) the models to keep warm. Never blocks or fails Ray's start-up:
# the prefetch step runs in the background, bounded, and only logs when it cannot do its job.
#
#   node-startup.sh head   [extra `ray start` args...]             # e.g. --port=6379 --dashboard-host=0.0.0.0
#   node-startup.sh worker HEAD_HOST:PORT [extra `ray start` args...]
#   node-startup.sh daemon                                          # Ray is started by someone else (KubeRay):
#                                                                   # wait for it, then declare the set
# Environment:
#   PREFETCH_CACHE_DIR      this node's cache dir, on its NVMe            (default /nvme/prefetch)
#   PREFETCH_MODELS_FILE    URIs to keep warm, one per line, # comments   (default /etc/prefetch/models.txt)
#   PREFETCH_MODELS         more URIs, comma or newline separated         (optional)
#   PREFETCH_INTERVAL       seconds between re-resolutions of @alias / latest / stages   (default 60)
#   PREFETCH_WAIT_SECONDS   how long the background step waits for Ray to come up       (default 300)
#   PREFETCH_LOG            where the background step logs            (default /tmp/prefetch-daemon.log)
#   MLFLOW_TRACKING_URI, MLFLOW_S3_ENDPOINT_URL, AWS_* ...: the registry, as for any MLflow client. The agent
#   runs in a Ray worker on this node and inherits this environment through the raylet.
#   RAY_AUTH_MODE / RAY_AUTH_TOKEN: with token auth on, `prefetch daemon` uses them like any Ray client (on the
#   node itself, Ray already turns token mode on when ~/.ray/auth_token exists).
#
# How processes on the node find the cache dir (prefetch/node.py): the node label `prefetch-cache-dir`, else
# PREFETCH_CACHE_DIR in the environment (workers inherit the raylet's). We set both. The label holds a path, so it
# must use the JSON form of --labels (Ray 2.60 accepts it, with a deprecation warning; the key=value form and
# --labels-file follow Kubernetes syntax, which has no "/"): where that form goes away, the env var is enough.
set -euo pipefail

mode="${1:-}"
[[ $# -gt 0 ]] && shift
CACHE_DIR="${PREFETCH_CACHE_DIR:-/nvme/prefetch}"
MODELS_FILE="${PREFETCH_MODELS_FILE:-/etc/prefetch/models.txt}"
INTERVAL="${PREFETCH_INTERVAL:-60}"
WAIT_SECONDS="${PREFETCH_WAIT_SECONDS:-300}"
LOG="${PREFETCH_LOG:-/tmp/prefetch-daemon.log}"

mkdir -p "$CACHE_DIR"
export PREFETCH_CACHE_DIR="$CACHE_DIR"
labels="{\"prefetch-cache-dir\": \"$CACHE_DIR\"}"

case "$mode" in
  head)
    ray start --head --labels="$labels" "$@"
    ;;
  worker)
    head_address="${1:?usage: node-startup.sh worker HEAD_HOST:PORT [ray start args...]}"
    shift
    ray start --address="$head_address" --labels="$labels" "$@"
    ;;
  daemon)
    ;;
  *)
    echo "usage: node-startup.sh head|worker HEAD_HOST:PORT|daemon [ray start args...]" >&2
    exit 2
    ;;
esac

args=(daemon --interval "$INTERVAL")
[[ -s "$MODELS_FILE" ]] && args+=(--models-file "$MODELS_FILE")
if [[ ! -s "$MODELS_FILE" && -z "${PREFETCH_MODELS:-}" ]]; then
  echo "$(date -Is) prefetch: no $MODELS_FILE and no PREFETCH_MODELS: nothing to keep warm on this node" >>"$LOG"
  exit 0
fi

# In the background: retry until the local raylet answers (address "auto" finds it), then declare and return.
# `prefetch daemon` itself returns within seconds (the agent and the controller are detached actors).
(
  set +e
  deadline=$(( $(date +%s) + WAIT_SECONDS ))
  while :; do
    timeout 120 prefetch "${args[@]}" >>"$LOG" 2>&1
    code=$?
    if (( code == 0 )); then
      echo "$(date -Is) prefetch: desired set declared (cache dir $CACHE_DIR)" >>"$LOG"
      break
    fi
    if (( code == 2 )); then   # bad models file or URI: retrying will not help
      echo "$(date -Is) prefetch: the desired set was refused (exit 2); fix $MODELS_FILE / PREFETCH_MODELS" >>"$LOG"
      break
    fi
    if (( $(date +%s) >= deadline )); then
      echo "$(date -Is) prefetch: gave up after ${WAIT_SECONDS}s (last exit $code); the controller still warms" \
           "this node if another node declared the set" >>"$LOG"
      break
    fi
    sleep 5
  done
) </dev/null >/dev/null 2>&1 &
disown || true
exit 0
