#!/usr/bin/env bash
# Runs the cluster suite (e2e/tests/cluster) against the cluster KUBECONFIG names: builds the
# images (scripts/images.sh), then installs, exercises and uninstalls Trazor there, writing
# its record to e2e/RESULTS.md. It deletes the namespaces trazor-e2e and trazor-e2e-shop and
# the Helm release "trazor" in trazor-e2e if they exist, and the TraceProfile CRD if
# something other than Helm applied it: use a cluster made for testing.
#
#   TRAZOR_E2E_IMAGE_LOADER   ctr (default: containerd on this machine, the node), kind:<name>,
#                             or none (images already on every node)
#   TRAZOR_E2E_HOST_ADDRESS   address at which pods reach this machine (the OTLP backend the
#                             suite runs here); default: the node's InternalIP
#   TRAZOR_E2E_SKIP_IMAGES=1  use the archives already in target/images
#
# Needs root for `ctr` and what scripts/setup.sh installs (helm, buildah, Rotel).
set -euo pipefail
cd "$(dirname "$0")/.."

# The cluster: KUBECONFIG, or ~/.kube/config.
scripts/setup.sh
if [ "${TRAZOR_E2E_SKIP_IMAGES:-0}" != "1" ]; then
    scripts/images.sh
fi
TRAZOR_E2E_CLUSTER=1 TRAZOR_E2E_RECORD="${TRAZOR_E2E_RECORD:-$PWD/e2e/RESULTS.md}" \
    cargo test --locked -p trazor-e2e --test cluster
