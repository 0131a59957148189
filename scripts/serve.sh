#!/usr/bin/env bash
# Set up (first run only) and start the engine. Configuration comes from the environment
# (API_PORT, API_HOST, MODEL_PATH, MODEL, N_CTX, N_THREADS, N_GPU_LAYERS, ...) or from flags,
# which are passed to `ai-engine serve`: scripts/serve.sh --api-port 5123
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
setup_all
exec "$VENV/bin/ai-engine" serve "$@"
