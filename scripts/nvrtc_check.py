#!/usr/bin/env python3
"""Compiles, with NVRTC, a kernel that includes every header cubecl's CUDA kernels include, with
the options cubecl passes: what the cuda backend needs of the machine before any kernel runs
(scripts/gpu-check.sh's first check; needs no GPU, only libnvrtc).

    nvrtc_check.py --nvrtc /path/libnvrtc.so.13 --cuda-path "$CUDA_PATH" --arch 90
"""
import argparse
import ctypes
import os
import sys

# cubecl-cpp 0.10's CUDA dialect: cuda_runtime.h always, the rest by the kernel's features
# (half types, tensor cores, pipelines, barriers and TMA, PTX wrappers).
SOURCE = b"""#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#include <cooperative_groups.h>
#include <cooperative_groups/memcpy_async.h>
#include <cuda/pipeline>
#include <cuda/barrier>
#include <cuda/ptx>
extern "C" __global__ void check(float* out, const __nv_bfloat16* x) {
    out[threadIdx.x] = __bfloat162float(x[threadIdx.x]) + 1.0f;
}
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nvrtc", required=True, help="the libnvrtc shared library")
    p.add_argument("--cuda-path", required=True, help="what cubecl takes as CUDA_PATH")
    p.add_argument("--arch", required=True, help="compute capability without the dot, e.g. 90")
    args = p.parse_args()

    lib = ctypes.CDLL(args.nvrtc)
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    include = os.path.join(args.cuda_path, "include")
    # cubecl: sm_XXa from Hopper on; the cccl folder only where it exists.
    arch = f"--gpu-architecture=sm_{args.arch}{'a' if int(args.arch) >= 90 else ''}"
    options = [arch, f"--include-path={include}", "-lineinfo"]
    if os.path.isdir(os.path.join(include, "cccl")):
        options.append(f"--include-path={os.path.join(include, 'cccl')}")
    print(f"NVRTC {major.value}.{minor.value} ({args.nvrtc}): {' '.join(options)}")

    program = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(program), SOURCE, b"check.cu", 0, None, None) != 0:
        sys.exit("nvrtcCreateProgram failed")
    encoded = [o.encode() for o in options]
    rc = lib.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    if rc != 0:
        print(log.value.decode(errors="replace"))
        sys.exit(f"NVRTC could not compile the headers cubecl's kernels include (error {rc}): the cuda backend cannot run here")
    lib.nvrtcGetPTXSize(program, ctypes.byref(size))
    print(f"compiled: {size.value} bytes of PTX")


if __name__ == "__main__":
    main()
