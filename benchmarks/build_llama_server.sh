#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` from the llama.cpp tree vendored in the llama-cpp-python sdist on PyPI,
# for benchmarks/serve_vs_llama_server.py (docs/serve.md, "Throughput vs llama.cpp's llama-server").
#
#   bash benchmarks/build_llama_server.sh DEST [native|avx2]
#
# DEST      folder for the sdist, its sources and the build (created; reused when run again)
# native    (default) llama.cpp's own default, GGML_NATIVE=ON: -march=native, i.e. every instruction set of this
#           CPU (AVX512, AVX512-BF16/VNNI where present). What `cmake -B build` gives a user building llama.cpp.
# avx2      GGML_NATIVE=OFF with AVX2+FMA+F16C only: a portable build, the same instruction set as chattune's
#           C kernel (models/blockweights.py).
#
# The pip download is the only network access: the web UI is neither built with npm nor fetched from the hub
# (LLAMA_BUILD_UI=OFF, LLAMA_USE_PREBUILT_UI=OFF), so the server has no page at / (the API is all we need).
# Env: LCP_VERSION (llama-cpp-python version, default 0.3.36), JOBS (parallel compile jobs, default 2).
# Prints the binary's path last: DEST/build-KIND/bin/llama-server.
set -euo pipefail

usage="usage: bash benchmarks/build_llama_server.sh DEST [native|avx2]"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
dest=$1
kind=${2:-native}
version=${LCP_VERSION:-0.3.36}
jobs=${JOBS:-2}

case "$kind" in
  native) arch_flags=(-DGGML_NATIVE=ON) ;;
  avx2)   arch_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON) ;;
  *) echo "unknown build kind '$kind': use native or avx2 ($usage)" >&2; exit 2 ;;
esac
for tool in cmake c++ python; do
  command -v "$tool" >/dev/null || { echo "$tool not found: install it first (cmake >= 3.14, a C++17 compiler)" >&2; exit 2; }
done

mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
sdist="$dest/llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
  python -m pip download --no-deps --no-binary :all: --disable-pip-version-check "llama-cpp-python==$version" -d "$dest"
fi
src="$dest/llama_cpp_python-$version/vendor/llama.cpp"
if [ ! -f "$src/CMakeLists.txt" ]; then
  tar -xzf "$sdist" -C "$dest"
fi

build="$dest/build-$kind"
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release "${arch_flags[@]}" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
cmake --build "$build" --config Release --target llama-server -j "$jobs"

"$build/bin/llama-server" --version 2>&1 | tail -n 2
echo "$build/bin/llama-server"
