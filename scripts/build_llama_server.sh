#!/usr/bin/env bash
# Build llama.cpp's own llama-server, llama-bench and llama-batched-bench, for the benchmark's
# side-by-side comparison only (the engine never runs them). The source is the llama.cpp that llama-cpp-python vendors, taken from
# the same PyPI sdist the engine's build uses, so both run the same llama.cpp commit; the CPU
# flags are the engine's (scripts/_setup.sh). Nothing is fetched from outside PyPI: the web UI
# is not built and no prebuilt UI is downloaded.
#
#   scripts/build_llama_server.sh             # prints llama-server's path (builds once, ~20 min)
#   scripts/build_llama_server.sh --if-built  # prints it only if built (exit 1 otherwise)
#
# The binaries land in one folder of the ai-engine cache, keyed by version and CMAKE_ARGS like the
# wheels; scripts/bench.py finds them there (llama-bench and llama-batched-bench beside
# llama-server).
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"

want="$(llama_cpp_build_spec)"
args="${want#*CMAKE_ARGS=}"
key="$(printf '%s' "$want" | sha256sum | cut -c1-16)"
dest="$LLAMA_SERVER_CACHE/$key"
tools=(llama-server llama-bench llama-batched-bench)
built() { local t; for t in "${tools[@]}"; do [ -x "$dest/$t" ] || return 1; done; }
if built; then
  echo "$dest/llama-server"
  exit 0
fi
[ "${1:-}" = "--if-built" ] && exit 1

ensure_venv
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log "downloading the llama-cpp-python $LLAMA_CPP_VERSION sdist (PyPI)"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
  -d "$work" "llama-cpp-python==$LLAMA_CPP_VERSION"
tar -xzf "$work"/llama_cpp_python-"$LLAMA_CPP_VERSION".tar.gz -C "$work"
src="$work/llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp"

log "building ${tools[*]} (CMAKE_ARGS=$args)"
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of flags
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF $args >&2
cmake --build "$work/build" --target "${tools[@]}" -j "$(nproc)" >&2

rm -rf "$dest.partial" && mkdir -p "$dest.partial"
for t in "${tools[@]}"; do cp "$work/build/bin/$t" "$dest.partial/"; done
printf '%s\n' "$want" > "$dest.partial/BUILD_INFO"
rm -rf "$dest" && mv "$dest.partial" "$dest"
echo "$dest/llama-server"
