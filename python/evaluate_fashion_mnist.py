"""Top-1 of an exported quickstart model on the Fashion-MNIST test set, in PyTorch through
nvit.py: the check that a model leaves the runner intact (it should print the top-1 that the
runner's `evaluate` stage wrote to results/quickstart/metrics.csv).

    python python/evaluate_fashion_mnist.py MODEL_FOLDER [FASHION_MNIST_ROOT]

MODEL_FOLDER holds model.safetensors and dims.json, as `runner export pipelines/quickstart.toml
--stage distill --out MODEL_FOLDER` writes them. Needs torch, safetensors, numpy.
"""
import gzip
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import nvit  # noqa: E402

folder = sys.argv[1]
root = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "/usr/share/datasets/fashion-mnist")


def idx(stem, header):
    path = next(root.glob(stem + "*"))
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    return np.frombuffer(data[header:], np.uint8)


images = idx("t10k-images-idx3-ubyte", 16).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
labels = idx("t10k-labels-idx1-ubyte", 8)
# The quickstart's [dataset] mean and std; no crop at evaluation (eval_crop_pct = 1.0).
x = (torch.from_numpy(images) - 0.286) / 0.353

model = nvit.load(folder).eval()
with torch.no_grad():
    predicted = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
top1 = (predicted.numpy() == labels).mean() * 100
print(f"{folder}: top-1 {top1:.2f}% on {len(labels)} Fashion-MNIST test images (PyTorch {torch.__version__})")
