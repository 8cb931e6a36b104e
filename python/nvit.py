"""The runner's models in PyTorch: a ViT / DeiT whose blocks each have their own widths.

A pruned NViT has per-block widths (heads, query/key and value width per head, MLP width)
that timm's `VisionTransformer` cannot express. This single file, which needs only torch and
safetensors, builds the model from the `dims.json` that the runner writes beside
`model.safetensors` (timm's tensor names) and loads the weights:

    import nvit
    model = nvit.load("path/to/exported/model")  # the folder with model.safetensors and dims.json
    model.eval()
    logits = model(images)  # [batch, classes]; a distilled model averages its two heads

A Swin's folder (its `dims.json` has `stages`) loads the same way, as `NSwin`. `images` are
`[batch, in_chans, image_size, image_size]`, normalized with the mean and std of
the pipeline's `[dataset]`. A dense timm DeiT checkpoint loads too, `nvit.from_timm(path,
heads=...)`, and gives timm's logits. `nvit.save(model, folder)` writes what the runner reads.
"""

import json
import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "model.safetensors"
DIMS = "dims.json"


class Attention(nn.Module):
    """Multi-head attention whose query/key width per head (`qk`) may differ from the value
    width (`v`). The softmax scale is `head_dim ** -0.5` of the model before pruning, so a
    pruned model computes what it was pruned from."""

    def __init__(self, dim, heads, qk, v, head_dim, qkv_bias=True):
        super().__init__()
        self.heads, self.qk_dim, self.v_dim = heads, qk, v
        self.scale = head_dim**-0.5
        self.q = nn.Linear(dim, heads * qk, bias=qkv_bias)
        self.k = nn.Linear(dim, heads * qk, bias=qkv_bias)
        self.v = nn.Linear(dim, heads * v, bias=qkv_bias)
        self.proj = nn.Linear(heads * v, dim)

    def forward(self, x):
        b, n, _ = x.shape
        if self.heads == 0:  # every head pruned: the branch is the projection's bias
            return self.proj(x.new_zeros(b, n, 0))

        def split(t, d):
            return t.reshape(b, n, self.heads, d).transpose(1, 2)  # [b, heads, n, d]

        q, k, v = split(self.q(x), self.qk_dim), split(self.k(x), self.qk_dim), split(self.v(x), self.v_dim)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # [b, heads, n, v]
        return self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.v_dim))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # the erf form, as timm and the runner
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """A learned gain per channel on a residual branch (timm's `ls1`, `ls2`)."""

    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, dims, head_dim, qkv_bias=True, init_values=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, dims["heads"], dims["qk"], dims["v"], head_dim, qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dims["mlp"])
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [b, patches, dim]


class NViT(nn.Module):
    """timm's `VisionTransformer` with the widths of `dims`, the runner's `dims.json`: DeiT
    (`distilled`), AugReg ViT, DeiT III and DINOv2 (LayerScale, register tokens, a position
    embedding over the patches only), average pooling with `fc_norm`. Keys a DeiT's file
    leaves out take DeiT's values."""

    def __init__(self, dims):
        super().__init__()
        self.dims = dims
        e, p = dims["embed_dim"], dims["patch_size"]
        patches = (dims["image_size"] // p) ** 2
        self.distilled = dims["distilled"]
        self.class_token = dims.get("class_token", True)
        self.reg_tokens = dims.get("reg_tokens", 0)
        self.global_pool = dims.get("global_pool", "token")
        self.no_embed_class = dims.get("no_embed_class", False)
        use_fc_norm = dims.get("fc_norm", False)
        self.num_prefix_tokens = int(self.class_token) + int(self.distilled) + self.reg_tokens
        self.patch_embed = PatchEmbed(p, dims["in_chans"], e)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e)) if self.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, e)) if self.distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, self.reg_tokens, e)) if self.reg_tokens else None
        positions = patches if self.no_embed_class else patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, positions, e))
        qkv_bias, init_values = dims.get("qkv_bias", True), dims.get("init_values")
        self.blocks = nn.ModuleList(Block(e, b, dims["head_dim"], qkv_bias, init_values) for b in dims["blocks"])
        self.norm = nn.LayerNorm(e, eps=1e-6) if not use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(e, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(e, dims["num_classes"])
        self.head_dist = nn.Linear(e, dims["num_classes"]) if self.distilled else None

    def forward_heads(self, images):
        """Logits of the class head and, for a distilled model, of the distillation head."""
        x = self.patch_embed(images)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        pooled = x[:, self.num_prefix_tokens :].mean(1) if self.global_pool == "avg" else x[:, 0]
        return self.head(self.fc_norm(pooled)), (self.head_dist(x[:, 1]) if self.distilled else None)

    def forward(self, images):
        """`[batch, classes]`: the class head, averaged with the distillation head's as DeiT
        evaluates (in training mode a distilled model returns both, as timm's does)."""
        cls, dist = self.forward_heads(images)
        if dist is None:
            return cls
        return (cls, dist) if self.training else (cls + dist) / 2


class SwinBlock(nn.Module):
    """A Swin block with the runner's per-block widths: attention within `window` x `window`
    windows of a `side` x `side` map, shifted cyclically by `shift` (0: unshifted), each head
    with its column of the relative position table."""

    def __init__(self, dim, dims, head_dim, window, shift, side):
        super().__init__()
        self.window, self.shift, self.side = window, shift, side
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, dims["heads"], dims["qk"], dims["v"], head_dim)
        self.attn.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, dims["heads"]))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("relative_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)
        mask = None
        if shift:
            region = torch.zeros(side, side, dtype=torch.long)
            cuts = (slice(0, side - window), slice(side - window, side - shift), slice(side - shift, side))
            for r, rows in enumerate(cuts):
                for c, cols in enumerate(cuts):
                    region[rows, cols] = 3 * r + c
            ids = self._windows(region[None, :, :, None]).reshape(-1, window * window)
            mask = (ids[:, :, None] != ids[:, None, :]).float() * -100.0  # [windows, n, n]
        self.register_buffer("mask", mask, persistent=False)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, dims["mlp"])

    def _windows(self, x):  # [b, side, side, c] -> [b * windows, n, c]
        b, _, _, c = x.shape
        w, k = self.window, self.side // self.window
        return x.reshape(b, k, w, k, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)

    def forward(self, x):
        b, l, c = x.shape
        w, k, n = self.window, self.side // self.window, self.window**2
        y = self.norm1(x).reshape(b, self.side, self.side, c)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        y = self.attn_windows(self._windows(y)).reshape(b, k, k, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, self.side, self.side, c)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y.reshape(b, l, c)
        return x + self.mlp(self.norm2(x))

    def attn_windows(self, x):
        a = self.attn
        bw, n, _ = x.shape
        bias = a.relative_position_bias_table[self.relative_index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)  # [h, n, n]
        bias = bias[None, None] if self.mask is None else bias[None, None] + self.mask[None, :, None]
        windows = bias.shape[1] if self.mask is not None else 1

        def split(t, d):
            return t.reshape(bw, n, a.heads, d).transpose(1, 2)

        q, k, v = split(a.q(x), a.qk_dim), split(a.k(x), a.qk_dim), split(a.v(x), a.v_dim)
        scores = (q * a.scale) @ k.transpose(-2, -1)  # [b * windows, h, n, n]
        scores = (scores.reshape(-1, windows, a.heads, n, n) + bias).reshape(bw, a.heads, n, n)
        out = scores.softmax(-1) @ v
        return a.proj(out.transpose(1, 2).reshape(bw, n, a.heads * a.v_dim))


class PatchMerging(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=1e-5)
        self.reduction = nn.Linear(4 * dim, out, bias=False)

    def forward(self, x, side):
        b, _, c = x.shape
        half = side // 2
        x = x.reshape(b, half, 2, half, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, half * half, 4 * c)
        return self.reduction(self.norm(x))


class SwinLayer(nn.Module):
    def __init__(self, downsample, blocks):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)


class NSwin(nn.Module):
    """timm's `SwinTransformer` with the widths of `dims` (the runner's `dims.json` of a Swin:
    each stage its width, each block its own)."""

    def __init__(self, dims):
        super().__init__()
        self.dims = dims
        p, window = dims["patch_size"], dims["window"]
        stages = dims["stages"]
        self.patch_embed = PatchEmbed(p, dims["in_chans"], stages[0]["embed_dim"])
        self.patch_embed.norm = nn.LayerNorm(stages[0]["embed_dim"], eps=1e-5)
        layers, prev, side = [], stages[0]["embed_dim"], dims["image_size"] // p
        for i, stage in enumerate(stages):
            e = stage["embed_dim"]
            merge = PatchMerging(prev, e) if i > 0 else None
            side = side // 2 if i > 0 else side
            w, shift = (side, 0) if side <= window else (window, window // 2)
            blocks = [SwinBlock(e, b, dims["head_dim"], w, shift if j % 2 else 0, side) for j, b in enumerate(stage["blocks"])]
            layers.append(SwinLayer(merge, blocks))
            prev = e
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(prev, eps=1e-5)
        self.head = nn.Module()
        self.head.fc = nn.Linear(prev, dims["num_classes"])

    def forward(self, images):
        x = self.patch_embed.norm(self.patch_embed(images))
        side = self.dims["image_size"] // self.dims["patch_size"]
        for layer in self.layers:
            if layer.downsample is not None:
                x = layer.downsample(x, side)
                side //= 2
            for block in layer.blocks:
                x = block(x)
        return self.head.fc(self.norm(x).mean(1))


def _blocks(dims):
    """`(prefix, widths)` of every block, a ViT's or a Swin's."""
    if "stages" in dims:
        return [(f"layers.{i}.blocks.{j}.attn", b) for i, s in enumerate(dims["stages"]) for j, b in enumerate(s["blocks"])]
    return [(f"blocks.{i}.attn", b) for i, b in enumerate(dims["blocks"])]


def _split_fused_qkv(state, dims):
    """timm's fused `attn.qkv` (rows: every head's q, then k, then v) as `q`, `k`, `v`."""
    state = dict(state)
    for p, b in _blocks(dims):
        if f"{p}.qkv.weight" not in state:
            continue
        sizes = [b["heads"] * b["qk"], b["heads"] * b["qk"], b["heads"] * b["v"]]
        for kind in ("weight", "bias"):
            if f"{p}.qkv.{kind}" not in state:  # qkv_bias = false
                continue
            for name, part in zip("qkv", state.pop(f"{p}.qkv.{kind}").split(sizes)):
                state[f"{p}.{name}.{kind}"] = part
    return state


def from_state_dict(state, dims):
    """A model of `dims` holding `state` (timm's names; fused or split `qkv`). Every tensor of
    the model must be there and nothing else: a mismatch names the tensors."""
    model = NSwin(dims) if "stages" in dims else NViT(dims)
    missing, unexpected = model.load_state_dict(_split_fused_qkv(state, dims), strict=False)
    if missing or unexpected:
        raise ValueError(f"state dict does not fit dims: missing {missing}, unexpected {unexpected}")
    return model


def load(folder):
    """The model the runner exported into `folder` (`model.safetensors` and `dims.json`)."""
    folder = pathlib.Path(folder)
    dims = json.loads((folder / DIMS).read_text())
    return from_state_dict(load_file(folder / WEIGHTS), dims)


def from_timm(path, heads):
    """A dense timm ViT / DeiT checkpoint (`.safetensors`, timm's names) with `heads` heads
    per block; the other widths come from the tensors' shapes."""
    state = load_file(path)
    e, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
    distilled = "dist_token" in state
    patches = state["pos_embed"].shape[1] - 1 - distilled
    grid = round(patches**0.5)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    blocks = [
        {"heads": heads, "qk": e // heads, "v": e // heads, "mlp": state[f"blocks.{i}.mlp.fc1.weight"].shape[0]}
        for i in range(depth)
    ]
    dims = {
        "image_size": grid * patch,
        "patch_size": patch,
        "in_chans": in_chans,
        "embed_dim": e,
        "num_classes": state["head.weight"].shape[0],
        "distilled": distilled,
        "head_dim": e // heads,
        "drop_path": 0.0,
        "blocks": blocks,
    }
    return from_state_dict(state, dims)


def save(model, folder):
    """Writes `model` as the runner exports: timm's names, `qkv` fused where a block's query/key
    and value widths are equal, and `dims.json`."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for p, b in _blocks(model.dims):
        if b["qk"] == b["v"]:
            for kind in ("weight", "bias")[: 2 if f"{p}.q.bias" in state else 1]:
                state[f"{p}.qkv.{kind}"] = torch.cat([state.pop(f"{p}.{n}.{kind}") for n in "qkv"])
    save_file(state, folder / WEIGHTS)
    (folder / DIMS).write_text(json.dumps(model.dims, indent=2) + "\n")
