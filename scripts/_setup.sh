# Shared set-up for scripts/serve.sh and scripts/test.sh (sourced, not run).
# Creates .venv, builds llama-cpp-python once with CPU flags that are safe on this machine,
# installs the project, and makes sure the embedded default model is present. Idempotent:
# a second run checks stamps and rebuilds nothing that is already right.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
LLAMA_CPP_VERSION="0.3.36"
CACHE_DIR="${AI_ENGINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ai-engine}"
WHEEL_CACHE="$CACHE_DIR/wheels"
LLAMA_SERVER_CACHE="$CACHE_DIR/llama-server"

log() { echo "[ai-engine] $*" >&2; }

ensure_venv() {
  if [ ! -x "$PY" ]; then
    log "creating virtual environment in $VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip setuptools wheel
  fi
}

# ggml's x86 feature flags, chosen from what this CPU reports. A native build (-march=native)
# enables ggml's AMX kernels on Sapphire Rapids and later Xeons, and those segfault in
# ggml_backend_amx_mul_mat on the first decode; listing the features explicitly avoids them.
cpu_cmake_args() {
  local flags
  [ -r /proc/cpuinfo ] || return 0
  case "$(uname -m)" in x86_64|amd64) ;; *) return 0 ;; esac
  flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  local args="-DGGML_NATIVE=OFF"
  has() { [[ "$flags" == *" $1 "* ]]; }
  has avx && args+=" -DGGML_AVX=ON"
  has avx2 && args+=" -DGGML_AVX2=ON"
  has fma && args+=" -DGGML_FMA=ON"
  has f16c && args+=" -DGGML_F16C=ON"
  has avx_vnni && args+=" -DGGML_AVX_VNNI=ON"
  has avx512f && args+=" -DGGML_AVX512=ON"
  has avx512_vnni && args+=" -DGGML_AVX512_VNNI=ON"
  has avx512_bf16 && args+=" -DGGML_AVX512_BF16=ON"
  echo "$args"
}

# Build llama-cpp-python once per (version, CMAKE_ARGS) into our own wheel cache. pip's cache
# does not key wheels by CMAKE_ARGS, so it would happily reinstall a CPU build after a user
# asked for CUDA; our cache directory name is a hash of both.
# What the installed llama-cpp-python must be: its version and the CMAKE_ARGS it was built with
# (the user's own CMAKE_ARGS, e.g. -DGGML_CUDA=on, win over the CPU flags).
llama_cpp_build_spec() {
  echo "llama-cpp-python==$LLAMA_CPP_VERSION CMAKE_ARGS=${CMAKE_ARGS:-$(cpu_cmake_args)}"
}

ensure_llama_cpp() {
  local want args
  want="$(llama_cpp_build_spec)"
  args="${want#*CMAKE_ARGS=}"
  local stamp="$VENV/.llama-cpp-build"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
     && "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
    return 0
  fi
  local key
  key="$(printf '%s' "$want" | sha256sum | cut -c1-16)"
  local dir="$WHEEL_CACHE/$key"
  if ! ls "$dir"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    log "building llama-cpp-python $LLAMA_CPP_VERSION (about 5 minutes on 2 cores)"
    log "CMAKE_ARGS=$args"
    mkdir -p "$dir.partial"
    CMAKE_ARGS="$args" "$PY" -m pip wheel --no-cache-dir --no-deps --disable-pip-version-check \
      -w "$dir.partial" "llama-cpp-python==$LLAMA_CPP_VERSION"
    rm -rf "$dir" && mv "$dir.partial" "$dir"
    printf '%s\n' "$want" > "$dir/BUILD_INFO"
  else
    log "using cached llama-cpp-python build from $dir"
  fi
  "$PY" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps \
    "$dir"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl
  # Its runtime dependencies (numpy, jinja2, ...) come with the project install below.
  printf '%s\n' "$want" > "$stamp"
}

# Install the project (editable) with the given extras; skipped when setup.cfg is unchanged.
ensure_project() {
  local extras="${1:-}"
  local spec="$ROOT"
  [ -n "$extras" ] && spec="$ROOT[$extras]"
  local want
  want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16) extras=$extras"
  local stamp="$VENV/.ai-engine-install"
  # An install with extras also serves a request for none (serve.sh after test.sh).
  if [ -f "$stamp" ] && { [ "$(cat "$stamp")" = "$want" ] || { [ -z "$extras" ] && [ "$(cut -d' ' -f1 "$stamp")" = "${want%% *}" ]; }; } \
     && "$PY" -c "import engine" 2>/dev/null; then
    return 0
  fi
  log "installing ai-engine${extras:+ with [$extras]}"
  "$PY" -m pip install --quiet --disable-pip-version-check -e "$spec"
  printf '%s\n' "$want" > "$stamp"
}

# The official JavaScript clients (tests/node/package.json, pinned by its lock file) for the
# real-client tests; skipped without node/npm, and when the lock file is unchanged.
ensure_node_clients() {
  command -v npm >/dev/null 2>&1 || { log "npm not found: the Node client tests will be skipped"; return 0; }
  local dir="$ROOT/tests/node"
  local want stamp="$dir/node_modules/.ai-engine-install"
  want="$(sha256sum < "$dir/package-lock.json" | cut -c1-16)"
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return 0
  log "installing the Node clients for the tests (npm ci in tests/node)"
  npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error >&2
  printf '%s\n' "$want" > "$stamp"
}

# Debian's Chromium, for the test that opens `ai-engine eval`'s report.html in a real browser
# (tests/test_eval_url.py). Installed only where apt-get can run as root (CI runs scripts/test.sh as
# root on a fresh machine) or through sudo without a password; otherwise that test is skipped.
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 && return 0
  command -v apt-get >/dev/null 2>&1 || { log "no apt-get: the browser test of eval's report will be skipped"; return 0; }
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    sudo -n true 2>/dev/null || { log "not root and no sudo: the browser test of eval's report will be skipped"; return 0; }
    sudo="sudo -n"
  fi
  log "installing Debian's chromium for the browser test of eval's report"
  $sudo apt-get install -y -q chromium >&2 || { $sudo apt-get update -q >&2 && $sudo apt-get install -y -q chromium >&2; } \
    || log "apt-get could not install chromium: the browser test of eval's report will be skipped"
}

ensure_default_model() {
  "$PY" -m engine ensure-model
}

setup_all() {
  ensure_venv
  ensure_llama_cpp
  ensure_project "${1:-}"
  ensure_default_model
  if [ "${1:-}" = test ]; then ensure_node_clients; ensure_chromium; fi
}
