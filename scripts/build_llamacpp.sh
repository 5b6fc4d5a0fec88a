#!/usr/bin/env bash
# Build llama.cpp's llama-bench (and with it libllama) from the source vendored in the llama-cpp-python
# sdist on PyPI, and a separate venv with what its convert_hf_to_gguf.py needs and what
# scripts/check_llamacpp_parity.py needs (the sdist's ctypes bindings on the libllama built here).
# A benchmark-time tool for `goose bench llamacpp`, never a test or CI step.
# About 20 minutes on 2 cores. Writes everything under $DEST (default /tmp/llamacpp):
#     $DEST/llama.cpp/build/bin/llama-bench         the benchmark (pass it to goose bench llamacpp --llama-bench)
#     $DEST/llama.cpp/convert_hf_to_gguf.py          the converter
#     $DEST/venv/bin/python                          a venv with the converter's dependencies
#     $DEST/llama_cpp_python/llama_cpp               the sdist's Python bindings (put $DEST/llama_cpp_python on
#                                                    PYTHONPATH, LLAMA_CPP_LIB_PATH=$DEST/llama.cpp/build/bin)
# Environment: DEST, VERSION (llama-cpp-python sdist version, default 0.3.36), SDIST (a downloaded sdist;
# otherwise pip downloads it), JOBS (default 2), PYTHON (default python3), TORCH (default torch==2.13.0).
set -euo pipefail
DEST=${DEST:-/tmp/llamacpp}
VERSION=${VERSION:-0.3.36}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
mkdir -p "$DEST"
cd "$DEST"

SDIST=${SDIST:-$DEST/llama_cpp_python-$VERSION.tar.gz}
if [ ! -f "$SDIST" ]; then
    "$PYTHON" -m pip download "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d "$DEST"
fi
if [ ! -d "$DEST/llama.cpp" ]; then
    tar xzf "$SDIST" -C "$DEST" "llama_cpp_python-$VERSION/vendor/llama.cpp"
    mv "$DEST/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DEST/llama.cpp"
    rm -rf "$DEST/llama_cpp_python-$VERSION"
fi
if [ ! -d "$DEST/llama_cpp_python/llama_cpp" ]; then
    tar xzf "$SDIST" -C "$DEST" "llama_cpp_python-$VERSION/llama_cpp"
    mkdir -p "$DEST/llama_cpp_python"
    mv "$DEST/llama_cpp_python-$VERSION/llama_cpp" "$DEST/llama_cpp_python/"
    rm -rf "$DEST/llama_cpp_python-$VERSION"
fi

cd "$DEST/llama.cpp"
cmake -B build -G Ninja -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
nice -n 10 cmake --build build -j "$JOBS" --target llama-bench

# The converter's dependencies, kept out of goose's own venv: torch first (as in the Makefile, so pip takes
# the CPU build), then the vendored gguf-py, numpy, safetensors and transformers (the converter), and
# jinja2, diskcache and typing_extensions (imported by the bindings).
if [ ! -x "$DEST/venv/bin/python" ]; then
    "$PYTHON" -m venv "$DEST/venv"
fi
"$DEST/venv/bin/python" -c "import torch" 2>/dev/null || "$DEST/venv/bin/pip" install -q "$TORCH"
"$DEST/venv/bin/pip" install -q "$DEST/llama.cpp/gguf-py" numpy safetensors transformers \
    jinja2 diskcache typing_extensions
echo "llama-bench: $DEST/llama.cpp/build/bin/llama-bench"
