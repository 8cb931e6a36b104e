#!/usr/bin/env python3
"""The PyTorch + timm side of `runner bench vs-pytorch`.

timm's own DeiT (`VisionTransformer`, `VisionTransformerDistilled`) with the geometry the
runner passes, timed the way `runner bench model` times its model: on the same synthetic batch,
one untimed step, then the median of `--steps` timed ones of
- train: forward in training mode (both heads for a distilled model), the mean of the two heads'
  cross-entropies against label-smoothed targets (0.1), backward, one AdamW step with timm's
  recipe (`create_optimizer_v2`, weight decay 0.05 off biases and norms);
- inference: forward in eval mode under `torch.inference_mode()`.
Prints one JSON object per measurement on stdout. Needs torch and timm (`pip install torch
timm`); the runner's tests never run it.
"""
import argparse
import json
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--patch-size", type=int, required=True)
    p.add_argument("--in-chans", type=int, required=True)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--embed-dim", type=int, required=True)
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--heads", type=int, required=True)
    p.add_argument("--mlp-ratio", type=float, required=True)
    p.add_argument("--distilled", action="store_true")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--threads", type=int, required=True, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--precision", choices=["f32", "f16", "bf16"], default="f32",
                   help="autocast dtype for f16/bf16 (weights and optimizer stay f32)")
    p.add_argument("--what", choices=["train", "inference", "both"], default="both")
    return p.parse_args()


def median_time(step, steps):
    """The median seconds of `steps` calls of `step`, as the runner takes them."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    kind = VisionTransformerDistilled if args.distilled else VisionTransformer
    model = kind(img_size=args.image_size, patch_size=args.patch_size, in_chans=args.in_chans,
                 num_classes=args.num_classes, embed_dim=args.embed_dim, depth=args.depth,
                 num_heads=args.heads, mlp_ratio=args.mlp_ratio, qkv_bias=True).to(device)
    if args.distilled:
        model.set_distilled_training(True)  # training mode returns both heads, as the runner's

    n, size = args.batch, args.image_size
    # The runner's synthetic pixels; the values do not change the time.
    i = torch.arange(n * args.in_chans * size * size, dtype=torch.float64)
    images = ((i * 7919) % 255 / 127.5 - 1.0).float().reshape(n, args.in_chans, size, size).to(device)
    labels = torch.arange(n, device=device) % args.num_classes
    targets = F.one_hot(labels, args.num_classes).float() * 0.9 + 0.1 / args.num_classes
    autocast = {"f16": torch.float16, "bf16": torch.bfloat16}.get(args.precision)

    def sync(t):
        return t.float().sum().item()  # a read of the result waits for the device

    def loss_of(output):
        heads = output if isinstance(output, tuple) else (output,)
        ce = [torch.sum(-targets * F.log_softmax(h.float(), dim=-1), dim=-1).mean() for h in heads]
        return sum(ce) / len(ce)

    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05)

    def train_step():
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = loss_of(model(images))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def infer():
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            return model(images)

    common = {"torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads()}
    if args.what in ("train", "both"):
        model.train()
        sync(train_step())
        rate = n / median_time(lambda: sync(train_step()), args.steps)  # the runner reads every loss
        print(json.dumps({"what": "train", "images_per_s": rate, **common}), flush=True)
    if args.what in ("inference", "both"):
        model.eval()
        sync(infer())
        rate = n / median_time(lambda: sync(infer()), args.steps)
        print(json.dumps({"what": "inference", "images_per_s": rate, **common}), flush=True)


if __name__ == "__main__":
    main()
