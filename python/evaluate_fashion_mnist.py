"""Top-1 of an exported quickstart model on the Fashion-MNIST test set, in PyTorch through
nvit.py or in ONNX Runtime: the check that a model leaves the runner intact (it should print the
top-1 that the runner's `evaluate` stage wrote to results/quickstart/metrics.csv).

    python python/evaluate_fashion_mnist.py MODEL [FASHION_MNIST_ROOT]

MODEL is a folder with model.safetensors and dims.json, as `runner export
pipelines/quickstart.toml --stage distill --out MODEL` writes them (needs torch, safetensors,
numpy), or an .onnx file from `--format onnx --out MODEL.onnx` (needs onnxruntime, numpy; the
normalization is read from the file).
"""
import gzip
import json
import pathlib
import sys

import numpy as np

model_path = sys.argv[1]
root = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "/usr/share/datasets/fashion-mnist")


def idx(stem, header):
    path = next(root.glob(stem + "*"))
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    return np.frombuffer(data[header:], np.uint8)


images = idx("t10k-images-idx3-ubyte", 16).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
labels = idx("t10k-labels-idx1-ubyte", 8)
batches = range(0, len(images), 1000)

if model_path.endswith(".onnx"):
    import onnxruntime as ort

    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    mean, std = json.loads(meta["mean"])[0], json.loads(meta["std"])[0]
    x = (images - mean) / std  # no crop at evaluation (eval_crop_pct = 1.0)
    predicted = np.concatenate([session.run(None, {"images": x[i : i + 1000]})[0].argmax(1) for i in batches])
    runtime = f"ONNX Runtime {ort.__version__}"
else:
    import torch

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import nvit  # noqa: E402

    # The quickstart's [dataset] mean and std; no crop at evaluation (eval_crop_pct = 1.0).
    x = (torch.from_numpy(images) - 0.286) / 0.353
    model = nvit.load(model_path).eval()
    with torch.no_grad():
        predicted = torch.cat([model(x[i : i + 1000]).argmax(1) for i in batches]).numpy()
    runtime = f"PyTorch {torch.__version__}"
top1 = (predicted == labels).mean() * 100
print(f"{model_path}: top-1 {top1:.2f}% on {len(labels)} Fashion-MNIST test images ({runtime})")
