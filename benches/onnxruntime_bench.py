#!/usr/bin/env python3
"""The ONNX Runtime side of `runner bench onnxruntime`.

Loads each ONNX file the runner exported (`--model NAME=PATH`, repeatable) into an
`onnxruntime.InferenceSession` (all graph optimizations on, the CPU provider or, with
`--device cuda`, the CUDA one) and times it the way `runner bench` times its own inference: on
one synthetic batch of the model's input shape, one untimed run, then the median of `--steps`
timed ones, at each of `--batches`. Prints one JSON object per measurement on stdout. Needs
onnxruntime and numpy (`pip install onnxruntime numpy`); the runner's tests never run it.
"""
import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--threads", type=int, required=True, help="intra-op threads")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return p.parse_args()


def session(path, args):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    providers = ["CUDAExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(path, options, providers=providers)


def main():
    args = parse_args()
    for spec in args.model:
        name, path = spec.split("=", 1)
        s = session(path, args)
        inp = s.get_inputs()[0]
        _, channels, height, width = inp.shape
        for batch in args.batches:
            # The pattern of `runner bench`'s synthetic batch: values in [-1, 1].
            x = (np.arange(batch * channels * height * width, dtype=np.int64) * 7919 % 255 / 127.5 - 1.0)
            x = x.astype(np.float32).reshape(batch, channels, height, width)
            s.run(None, {inp.name: x})
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                s.run(None, {inp.name: x})
                times.append(time.perf_counter() - start)
            print(json.dumps({
                "model": name,
                "batch": batch,
                "images_per_s": batch / statistics.median(times),
                "onnxruntime": ort.__version__,
                "provider": s.get_providers()[0],
                "threads": args.threads,
            }), flush=True)


if __name__ == "__main__":
    main()
