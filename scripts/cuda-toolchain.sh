#!/usr/bin/env bash
# Sets up a CUDA 13.0 build toolchain on a machine with no GPU and no CUDA install, so that
# `cargo build --release --features cuda` compiles and links the GPU binary there.
#
#   source scripts/cuda-toolchain.sh [PREFIX]        # default PREFIX=$HOME/.cache/moelab/cuda13
#
# What it does:
#   - installs pinned CUDA 13.0 wheels from PyPI (nvcc, runtime, cuBLAS, cuRAND, NVRTC) into a
#     venv under PREFIX; about 20 s the first time, nothing afterwards;
#   - makes the unversioned .so links the linker looks for, and libcuda.so and libnccl.so *stubs*
#     exporting the symbols cudarc names (the driver ships in no wheel and NCCL is not needed to
#     build; the GPU machine's real libcuda.so.1 and libnccl.so.2 are used at run time, as with
#     NVIDIA's own lib64/stubs);
#   - exports CUDA_ROOT/CUDA_PATH/CUDA_HOME, PATH (nvcc), LIBRARY_PATH and CUDA_COMPUTE_CAP=90.
#
# Why 13.0 exactly: candle loads its kernels as PTX and a driver can only JIT PTX from a toolkit
# no newer than itself; the target H200 driver is 580.x (CUDA 13.0). Our own kernels are built
# by crates/moelab-kernels/build.rs as sm_90 cubin + compute_90 PTX in one fatbin.
# Needs `cargo fetch` once before (the stub's symbol list is read from cudarc's sources).
#
# The first `cargo build --features cuda` takes about 20 minutes on 2 cores (candle-kernels);
# keep CARGO_TARGET_DIR fixed between builds to pay that once (.ci/run does).
_moelab_cuda_setup() {
  local prefix=${1:-${MOELAB_CUDA_PREFIX:-$HOME/.cache/moelab/cuda13}}
  if [ ! -x "$prefix/venv/bin/python" ] || [ ! -f "$prefix/.complete" ]; then
    mkdir -p "$prefix" && python3 -m venv "$prefix/venv" || return 1
    "$prefix/venv/bin/pip" install -q --disable-pip-version-check \
      nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
      nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.0.19 \
      nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 || { echo "cuda-toolchain: pip install failed" >&2; return 1; }
    touch "$prefix/.complete"
  fi
  local nv
  nv=$(echo "$prefix"/venv/lib/python3*/site-packages/nvidia/cu13)
  [ -x "$nv/bin/nvcc" ] || { echo "cuda-toolchain: no nvcc under $nv" >&2; return 1; }
  (
    cd "$nv/lib" || exit 1
    for f in cublas cublasLt cudart nvrtc; do ln -sf "lib$f.so.13" "lib$f.so"; done
    ln -sf libcurand.so.10 libcurand.so
    if [ ! -f libcuda.so ]; then
      local src
      src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -1)
      [ -n "$src" ] || { echo "cuda-toolchain: cudarc 0.19 sources not found; run 'cargo fetch' first" >&2; exit 1; }
      grep -oE '^\s+fn (cu[A-Za-z0-9_]+)\(' "$src" | sed -E 's/.*fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
        | awk '{print "void " $1 "(void){}"}' > libcuda_stub.c
      gcc -shared -fPIC -o libcuda.so -Wl,-soname,libcuda.so.1 libcuda_stub.c || exit 1
    fi
    # The same for NCCL (candle's `nccl` feature, which moelab's cuda feature turns on, links
    # -lnccl): a stub with the symbols cudarc names; the GPU machine's real libnccl.so.2 (torch's
    # nvidia-nccl wheel, see scripts/gpu-check.sh) is loaded at run time.
    if [ ! -f libnccl.so ]; then
      local nsrc
      nsrc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/nccl/sys/mod.rs 2>/dev/null | tail -1)
      [ -n "$nsrc" ] || { echo "cuda-toolchain: cudarc 0.19 nccl sources not found; run 'cargo fetch' first" >&2; exit 1; }
      grep -oE '^\s+fn (nccl[A-Za-z0-9_]+)\(' "$nsrc" | sed -E 's/.*fn (nccl[A-Za-z0-9_]+)\(/\1/' | sort -u \
        | awk '{print "void " $1 "(void){}"}' > libnccl_stub.c
      gcc -shared -fPIC -o libnccl.so -Wl,-soname,libnccl.so.2 libnccl_stub.c || exit 1
    fi
  ) || { echo "cuda-toolchain: library setup failed" >&2; return 1; }
  export CUDA_ROOT=$nv CUDA_PATH=$nv CUDA_HOME=$nv
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
  case ":$PATH:" in *":$nv/bin:"*) ;; *) export PATH=$nv/bin:$PATH ;; esac
  export LIBRARY_PATH=$nv/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
  echo "cuda-toolchain: $(nvcc --version | grep -o 'release [0-9.]*'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, CUDA_ROOT=$nv"
}
_moelab_cuda_setup "$@"
