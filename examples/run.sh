#!/usr/bin/env bash
# `make run`: falco-talon on the embedded default, the project's local control plane.
# Starts (or reuses) etcd + kube-apiserver and the test kubelet (for exec), creates the
# demo workloads, then runs the server in the foreground with examples/. Ctrl-C stops the
# server and the kubelet; `make testenv-down` stops the control plane.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

envfile=$("$BIN/python" -m tests.env.testenv up)
# shellcheck disable=SC1090
. "$envfile"
"$BIN/python" -m tests.env.kubelet --kubeconfig "$KUBECONFIG" &
kubelet=$!
trap 'kill "$kubelet" 2>/dev/null; wait "$kubelet" 2>/dev/null || true' EXIT
"$BIN/python" examples/demo.py setup --kubeconfig "$KUBECONFIG"

cat <<TXT

falco-talon on http://127.0.0.1:2803, acting on the local control plane ($TESTENV_APISERVER_URL).
In another terminal, send sample Falco events for pod demo/web-7d4b9c7f5d-x2x8k:
  curl -s -XPOST http://127.0.0.1:2803/ -d @examples/event-warning.json   # Warning: isolate, exec, label
  curl -s -XPOST http://127.0.0.1:2803/ -d @examples/event.json           # Critical: isolate, exec, terminate
then see what happened:
  $BIN/python examples/demo.py status --kubeconfig $KUBECONFIG
(make testenv-down stops the control plane; make run again recreates the demo pods)

TXT
KUBECONFIG="$KUBECONFIG" "$BIN/falco-talon" server -c examples/config.yaml -r examples/rules.yaml
