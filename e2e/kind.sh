#!/usr/bin/env bash
# The cluster suite on a kind cluster, for machines with Docker: creates the cluster
# "trazor-e2e" (unless it exists), builds the images, loads them with `kind load
# image-archive`, runs the suite (e2e/cluster.sh), and deletes the cluster afterwards
# (KEEP_CLUSTER=1 keeps it).
#
# UNVERIFIED: the machines this project is developed and tested on have no Docker engine, so
# this script has never run. The suite itself was run on a real single-node cluster
# (kubeadm-less control plane + kubelet on containerd); see e2e/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=trazor-e2e
command -v kind >/dev/null || { echo "kind not found: https://kind.sigs.k8s.io" >&2; exit 1; }
command -v docker >/dev/null || { echo "docker not found: kind needs a Docker engine" >&2; exit 1; }

if ! kind get clusters | grep -qx "$CLUSTER"; then
    kind create cluster --name "$CLUSTER" --wait 120s
fi
if [ "${KEEP_CLUSTER:-0}" != "1" ]; then
    trap 'kind delete cluster --name "$CLUSTER"' EXIT
fi
KUBECONFIG="$(mktemp)"
export KUBECONFIG
kind get kubeconfig --name "$CLUSTER" > "$KUBECONFIG"

# Pods reach this machine (where the suite runs its OTLP backend) at the gateway of kind's
# Docker network.
gateway=$(docker network inspect kind -f '{{range .IPAM.Config}}{{.Gateway}} {{end}}' | tr ' ' '\n' | grep -m1 '\.')
TRAZOR_E2E_IMAGE_LOADER="kind:$CLUSTER" TRAZOR_E2E_HOST_ADDRESS="$gateway" \
    TRAZOR_E2E_RECORD="${TRAZOR_E2E_RECORD:-$PWD/target/tmp/kind-results.md}" e2e/cluster.sh
