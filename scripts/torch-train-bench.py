"""PyTorch reference for the training-step benchmark (stages/mil/benches/train_step.rs): the
same MIL models, the same step (forward, cross-entropy, backward, clip_grad_norm_, Adam with L2
weight decay), on bags of the same shapes, so the bench can time both in one run.

The bench starts this script with `--serve [--threads N]` (N: tessera's rayon threads, 2 on
the project's machine and by default) and drives it over stdin/stdout, one JSON object
per line each way, so that tessera's and PyTorch's measurements interleave (round after round)
instead of coming from different runs:

    {"cmd": "setup", "id": ..., "model": ModelConfig, "standardize": bool,
     "optimizer": AdamConfig, "grad_clip": f, "bags": [[k, density, seed], ...], "batch": b,
     "device": "cpu" | "cuda", "alternate_labels": bool}        -> {"ok": true}
    {"cmd": "steps", "id": ..., "n": n}    -> {"ms": [n per-step milliseconds]}
    {"cmd": "epoch", "id": ...}            -> {"s": seconds for one pass over the bags, from a
                                               freshly initialised model}
    {"cmd": "check", "path": file.safetensors, "model": ..., "optimizer": ..., "grad_clip": f,
     "batch_sizes": [...], "steps": n}     -> {"losses": [n losses]}
    {"cmd": "quit"}

`check` loads tessera's initial weights, bags and standardisation statistics (written by the
bench, tessera's parameter names) and returns the losses of `steps` training steps, which the
bench compares with its own: the two sides compute the same function.

The models follow tessera's (stages/mil/src/models): standardisation `(x - mean) * (1 / std)`,
the instance encoder (Linear + ReLU per width), then
  sparseconvmil: submanifold 3x3 convolutions with bias + ReLU in the im2col formulation (each
    active site's k x k neighbours gathered through a dense lookup grid into `[N, k*k*C]`, empty
    neighbours reading a zero row, times the `[k*k*C, out]` weight; the neighbour index is
    built from the coordinates in every step, as tessera builds its rulebook), global average
    or max pooling per bag;
  attention / gated_attention (Ilse et al. 2018), mean / max (embedding-level),
  instance_mean / instance_max (instance-level);
  transmil / transmil_map: TransMIL as its authors build it (github.com/szc19990412/TransMIL,
    models/TransMIL.py: class token, padding to a square by repeating the first tokens, two
    `x + NystromAttention(LayerNorm(x))` layers around PPEG, LayerNorm, class token to the head)
    with lucidrains' `NystromAttention` (pip package `nystrom-attention`, imported only for
    these models), one bag at a time; transmil_map runs PPEG's convolutions on each bag's
    sparse-map bounding box (tokens scattered into a zero image, outputs read back on their
    cells), the submanifold semantics of tessera's;
and the shared head Linear(in, hidden) + ReLU + Linear(hidden, classes). Only what the bench
uses is implemented (no dropout, batch-norm or LSE; bags of one batch have equal sizes for the
permutation-invariant models).

Needs torch (and numpy through it), and for transmil nystrom-attention (with einops);
`torch.set_num_threads(N)`.
"""
import json
import math
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def bench_bag(k, density, seed, dim):
    """K instances on distinct random cells of a square of about K / density cells, uniform
    [0, 1) embeddings: the semantics of the bench's `bag` (values differ, shapes match)."""
    g = torch.Generator().manual_seed(seed)
    side = max(1, math.ceil(math.sqrt(k / density)))
    cells = torch.randperm(side * side, generator=g)[:k]
    coords = torch.stack([cells // side, cells % side], dim=1)
    x = torch.rand(k, dim, generator=g)
    return x, coords, seed % 2


class SubmanifoldConv(nn.Module):
    """Weight `[k*k, C_in, C_out]`, offset `k = di * kernel + dj` (tessera-sparse's layout, that
    of sparseconvnet), bias `[C_out]`; PyTorch Conv2d's init bound 1/sqrt(C_in * k * k)."""

    def __init__(self, cin, cout, kernel):
        super().__init__()
        bound = 1.0 / math.sqrt(cin * kernel * kernel)
        self.weight = nn.Parameter(torch.empty(kernel * kernel, cin, cout).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(cout).uniform_(-bound, bound))

    def forward(self, x, nbr):
        n, c = x.shape
        kk = nbr.shape[1]
        padded = torch.cat([x, x.new_zeros(1, c)])  # row n: the empty neighbour
        cols = padded.index_select(0, nbr.reshape(-1)).reshape(n, kk * c)
        return torch.addmm(self.bias, cols, self.weight.reshape(kk * c, -1))


class Block(nn.Module):
    def __init__(self, cin, cout, kernel):
        super().__init__()
        self.conv = SubmanifoldConv(cin, cout, kernel)


def neighbour_index(coords, bag_index, n_bags, kernel):
    """`[N, k*k]` row of each site's neighbour at every offset (N where inactive), through a
    dense `[B, H, W]` lookup grid of the bags' bounding boxes; torch ops only."""
    n = coords.shape[0]
    r = kernel // 2
    i = coords[:, 0] + r
    j = coords[:, 1] + r
    h = int(i.max()) + r + 1
    w = int(j.max()) + r + 1
    grid = torch.full((n_bags, h, w), n, dtype=torch.long, device=coords.device)
    grid[bag_index, i, j] = torch.arange(n, device=coords.device)
    d = torch.arange(-r, r + 1, device=coords.device)
    di = d.repeat_interleave(kernel)  # k = (di + r) * kernel + (dj + r)
    dj = d.repeat(kernel)
    return grid[bag_index[:, None], i[:, None] + di, j[:, None] + dj]


class Head(nn.Module):
    def __init__(self, cin, hidden, classes):
        super().__init__()
        if hidden:
            self.hidden = nn.Linear(cin, hidden)
            cin = hidden
        else:
            self.hidden = None
        self.out = nn.Linear(cin, classes)

    def forward(self, x):
        if self.hidden is not None:
            x = F.relu(self.hidden(x))
        return self.out(x)


class Attention(nn.Module):
    def __init__(self, dim, hidden, gated):
        super().__init__()
        self.v = nn.Linear(dim, hidden)
        self.u = nn.Linear(dim, hidden) if gated else None
        self.w = nn.Linear(hidden, 1)

    def forward(self, x):
        a = torch.tanh(self.v(x))
        if self.u is not None:
            a = a * torch.sigmoid(self.u(x))
        return torch.softmax(self.w(a), dim=1)


class PPEG(nn.Module):
    """x + dwconv7(x) + dwconv5(x) + dwconv3(x) over an image of the patch tokens (depthwise,
    with bias, zero padding k // 2), as the TransMIL authors' PPEG; `cells` `[n, 2]` places the
    tokens (tessera's transmil_map), else they fill an `h x h` square row-major."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, side=None, cells=None):
        n, c = x.shape
        if cells is None:
            image = x.t().reshape(1, c, side, side)
        else:
            h, w = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
            flat = cells[:, 0] * w + cells[:, 1]
            image = x.new_zeros(c, h * w).index_copy(1, flat, x.t()).reshape(1, c, h, w)
        y = image + self.proj(image) + self.proj1(image) + self.proj2(image)
        y = y.reshape(c, -1)
        return y.t() if cells is None else y[:, flat].t()


class TransLayer(nn.Module):
    def __init__(self, dim, dropout):
        super().__init__()
        from nystrom_attention import NystromAttention

        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(
            dim=dim, dim_head=dim // 8, heads=8, num_landmarks=dim // 2, pinv_iterations=6,
            residual=True, dropout=dropout,
        )

    def forward(self, x):
        return x + self.attn(self.norm(x))


class TransMIL(nn.Module):
    """The authors' TransMIL after `_fc1` (tessera's shared encoder plays it); parameter names
    as tessera's `transmil.*` but `attn.to_out.0.*` (an nn.Sequential there)."""

    def __init__(self, dim, on_map, dropout):
        super().__init__()
        self.on_map = on_map
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, dropout)
        self.pos_layer = PPEG(dim)
        self.layer2 = TransLayer(dim, dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, h, cells):
        """The class token after the last norm `[1, dim]`, for one bag `h` `[n, dim]`."""
        n = h.shape[0]
        if self.on_map:
            side = None
            cells = cells - cells.min(0).values
        else:
            side = math.ceil(math.sqrt(n))
            h = torch.cat([h, h[: side * side - n]])
            cells = None
        x = torch.cat([self.cls_token[0], h])[None]
        x = self.layer1(x)[0]
        x = torch.cat([x[:1], self.pos_layer(x[1:], side, cells)])[None]
        x = self.layer2(x)
        return self.norm(x[0, :1])


class MilNet(nn.Module):
    """tessera's `MilNet` with the same parameter names (`encoder.0.weight`, `sparse.0.conv.*`,
    `attention.v.*`, `head.hidden.*`, `head.out.*`), so its weights load one-to-one."""

    def __init__(self, cfg):
        super().__init__()
        if cfg["dropout"] or cfg["encoder_dropout"] or cfg.get("sparse_batch_norm"):
            raise ValueError("dropout and batch-norm are not implemented here")
        self.pooling = cfg["pooling"]
        self.kernel = cfg["sparse_kernel"]
        self.sparse_pool = cfg["sparse_pool"]
        width = cfg["input_dim"]
        self.encoder = nn.ModuleList()
        for out in cfg["instance_encoder"]:
            self.encoder.append(nn.Linear(width, out))
            width = out
        if self.pooling == "sparseconvmil":
            self.sparse = nn.ModuleList()
            for out in cfg["sparse_channels"]:
                self.sparse.append(Block(width, out, self.kernel))
                width = out
        elif self.pooling in ("attention", "gated_attention"):
            self.attention = Attention(width, cfg["attention_hidden"], self.pooling == "gated_attention")
        elif self.pooling in ("transmil", "transmil_map"):
            dropout = cfg.get("attention_dropout", 0.1)
            self.transmil = TransMIL(width, self.pooling == "transmil_map", dropout)
        elif self.pooling not in ("mean", "max", "instance_mean", "instance_max"):
            raise ValueError(f"pooling {self.pooling} is not implemented here")
        self.head = Head(width, cfg["head_hidden"], cfg["n_classes"])
        self.register_buffer("mean", torch.zeros(cfg["input_dim"]))
        self.register_buffer("inv_std", torch.ones(cfg["input_dim"]))

    def standardize_with(self, mean, std):
        self.mean.copy_(mean)
        self.inv_std.copy_(1.0 / std)

    def forward(self, x, coords, bag_index, n_bags):
        x = (x - self.mean) * self.inv_std
        for layer in self.encoder:
            x = F.relu(layer(x))
        if self.pooling == "sparseconvmil":
            nbr = neighbour_index(coords, bag_index, n_bags, self.kernel)
            for block in self.sparse:
                x = F.relu(block.conv(x, nbr))
            c = x.shape[1]
            if self.sparse_pool == "avg":
                sums = x.new_zeros(n_bags, c).index_add(0, bag_index, x)
                counts = torch.bincount(bag_index, minlength=n_bags).to(x.dtype)
                pooled = sums / counts[:, None]
            else:
                pooled = x.new_zeros(n_bags, c).scatter_reduce(
                    0, bag_index[:, None].expand(-1, c), x, "amax", include_self=False
                )
            return self.head(pooled)
        if self.pooling in ("transmil", "transmil_map"):
            pooled = torch.cat(
                [self.transmil(x[bag_index == b], coords[bag_index == b]) for b in range(n_bags)]
            )
            return self.head(pooled)
        x = x.reshape(n_bags, -1, x.shape[1])  # equal-sized bags
        if self.pooling in ("attention", "gated_attention"):
            return self.head((x * self.attention(x)).sum(1))
        if self.pooling == "mean":
            return self.head(x.mean(1))
        if self.pooling == "max":
            return self.head(x.amax(1))
        scores = self.head(x)
        return scores.mean(1) if self.pooling == "instance_mean" else scores.amax(1)


# Models whose PyTorch side is a published implementation rather than tessera's formulation:
# torchmil's (PyPI) ABMIL, CLAM_SB and DSMIL; CLAM-MB (which torchmil lacks) after the authors'
# model_clam.py. Their parameters differ from tessera's, so the bench times them but cannot run
# the same-weights check on them. (TransMIL is the authors' model, in MilNet above.)
REFERENCE_POOLINGS = {"abmil", "clam_sb", "clam_mb", "dsmil"}


class ClamMB(nn.Module):
    """CLAM-MB as mahmoodlab/CLAM's `CLAM_MB` (gated attention with one branch per class,
    an independent Linear(L, 1) bag classifier per class, one 2-way instance classifier per
    class, k_sample top/bottom pseudo-labels for the true class's branch), cross-entropy
    instance loss (`--inst_loss ce`), one bag at a time as the authors train."""

    def __init__(self, width, hidden, classes, k):
        super().__init__()
        self.a = nn.Linear(width, hidden)
        self.b = nn.Linear(width, hidden)
        self.c = nn.Linear(hidden, classes)
        self.classifiers = nn.ModuleList([nn.Linear(width, 1) for _ in range(classes)])
        self.instance_classifiers = nn.ModuleList([nn.Linear(width, 2) for _ in range(classes)])
        self.k, self.classes = k, classes

    def loss(self, h, label):
        A = self.c(torch.tanh(self.a(h)) * torch.sigmoid(self.b(h))).t()  # C x N
        A = F.softmax(A, dim=1)
        k = min(self.k, h.shape[0])
        a = A[label]
        top = torch.topk(a, k)[1]
        bottom = torch.topk(-a, k)[1]
        inst = self.instance_classifiers[label](torch.cat([h[top], h[bottom]]))
        targets = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)]).to(h.device)
        inst_loss = F.cross_entropy(inst, targets)
        M = A @ h
        logits = torch.cat([self.classifiers[c](M[c]) for c in range(self.classes)]).unsqueeze(0)
        bag_loss = F.cross_entropy(logits, torch.tensor([label], device=h.device))
        return 0.7 * bag_loss + 0.3 * inst_loss


class ReferenceNet(nn.Module):
    """A published implementation of `cfg["pooling"]` behind tessera's standardisation and
    instance encoder (Linear + ReLU per width), trained with the authors' loss: CLAM's bag
    weight 0.7 / instance 0.3, DSMIL's 0.5 bag / 0.5 max-instance. torchmil's models are
    binary (BCE on one logit); the bench's task is binary too."""

    def __init__(self, cfg):
        super().__init__()
        import torchmil.models as tm

        self.pooling = cfg["pooling"]
        width = cfg["input_dim"]
        self.encoder = nn.ModuleList()
        for out in cfg["instance_encoder"]:
            self.encoder.append(nn.Linear(width, out))
            width = out
        o = cfg.get("clam_dsmil", {})
        hidden, k = o.get("abmil_hidden", 256), o.get("clam_k", 8)
        self.weights = {}
        if self.pooling == "abmil":
            self.net = tm.ABMIL(in_shape=(width,), att_dim=hidden, gated=True)
        elif self.pooling == "clam_sb":
            # torchmil's BCE instance loss fails on its 2-way instance classifiers; its default
            # (CLAM's own default) is the smooth top-1 SVM.
            self.net = tm.CLAM_SB(in_shape=(width,), att_dim=hidden, gated=True, k_sample=k)
            self.weights = {"BCEWithLogitsLoss": 0.7, "InstLoss": 0.3}
        elif self.pooling == "dsmil":
            self.net = tm.DSMIL(in_shape=(width,), att_dim=o.get("dsmil_query", 128), nonlinear_q=True)
            self.weights = {"BCEWithLogitsLoss": 0.5, "BCEWithLogitsLoss_max": 0.5}
        elif self.pooling == "clam_mb":
            self.net = ClamMB(width, hidden, cfg["n_classes"], k)
        else:
            raise ValueError(f"no reference for {self.pooling}")
        self.register_buffer("mean", torch.zeros(cfg["input_dim"]))
        self.register_buffer("inv_std", torch.ones(cfg["input_dim"]))

    def standardize_with(self, mean, std):
        self.mean.copy_(mean)
        self.inv_std.copy_(1.0 / std)

    def train_loss(self, x, labels, n_bags):
        x = (x - self.mean) * self.inv_std
        for layer in self.encoder:
            x = F.relu(layer(x))
        X = x.reshape(n_bags, -1, x.shape[1])  # equal-sized bags
        if isinstance(self.net, ClamMB):
            return sum(self.net.loss(X[b], int(labels[b])) for b in range(n_bags)) / n_bags
        _, losses = self.net.compute_loss(labels.float(), X)
        return sum(self.weights.get(name, 1.0) * v for name, v in losses.items())


def standardization(xs):
    """Population mean / std per dimension of the bags' instances (ddof 0, f64 sums as tessera's
    `Standardization::fit`); 1 for a constant dimension."""
    x = torch.cat(xs).double()
    mean = x.mean(0)
    var = (x.pow(2).mean(0) - mean.pow(2)).clamp_min(0)
    std = torch.where(var <= 1e-12 * mean.pow(2).clamp_min(1e-300), torch.ones_like(var), var.sqrt())
    return mean.float(), std.float()


class Trainer:
    """A model, its optimizer and bags, stepped as tessera's `Trainer::step`. With
    `alternate_labels`, every step flips the labels (see the bench: a fixed label on one bag is
    fitted to a zero loss within ~30 steps, after which both sides time subnormal arithmetic)."""

    def __init__(self, cfg, optimizer, grad_clip, bags, batch, device, standardize, alternate_labels=False):
        self.device = torch.device(device)
        self.cfg, self.optimizer, self.grad_clip = cfg, optimizer, grad_clip
        self.bags = [(x.to(self.device), c.to(self.device), y) for x, c, y in bags]
        self.batch = batch
        self.next = 0
        self.alternate_labels = alternate_labels
        self.count = 0
        self.stats = None
        if standardize:
            mean, std = standardization([x for x, _, _ in bags])
            self.stats = (mean.to(self.device), std.to(self.device))
        self.reset()

    def reset(self):
        """A freshly initialised model and optimizer (same standardisation)."""
        net = ReferenceNet if self.cfg["pooling"] in REFERENCE_POOLINGS else MilNet
        self.model = net(self.cfg).to(self.device)
        if self.stats is not None:
            self.model.standardize_with(*self.stats)
        o = self.optimizer
        self.opt = torch.optim.Adam(
            self.model.parameters(),
            lr=o["lr"],
            betas=(o["beta1"], o["beta2"]),
            eps=o["eps"],
            weight_decay=o["weight_decay"],
        )

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, bags):
        """One step on `bags`: stack them (as tessera's `BagBatch::from_bags`), forward, loss,
        backward, clip, Adam. Returns the loss."""
        x = torch.cat([b[0] for b in bags])
        coords = torch.cat([b[1] for b in bags])
        bag_index = torch.cat(
            [torch.full((b[0].shape[0],), n, dtype=torch.long, device=self.device) for n, b in enumerate(bags)]
        )
        labels = torch.tensor([b[2] for b in bags], device=self.device)
        if isinstance(self.model, ReferenceNet):
            loss = self.model.train_loss(x, labels, len(bags))
        else:
            loss = F.cross_entropy(self.model(x, coords, bag_index, len(bags)), labels)
        value = loss.item()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.sync()
        return value

    def next_batch(self):
        bags = self.bags[self.next : self.next + self.batch]
        self.next = (self.next + self.batch) % len(self.bags)
        if self.alternate_labels:
            bags = [(x, c, (y + self.count) % 2) for x, c, y in bags]
        self.count += 1
        return bags

    def steps(self, n):
        times = []
        for _ in range(n):
            bags = self.next_batch()
            t = time.perf_counter()
            self.step(bags)
            times.append((time.perf_counter() - t) * 1e3)
        return times

    def epoch(self):
        t = time.perf_counter()
        for s in range(0, len(self.bags), self.batch):
            self.step(self.bags[s : s + self.batch])
        return time.perf_counter() - t


SAFETENSORS_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "U32": np.uint32, "U8": np.uint8}


def read_safetensors(path):
    """name -> tensor of a .safetensors file (8-byte little-endian header length, JSON header,
    raw little-endian data): enough for the bench's file, without the safetensors package."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        buf = data[8 + n + start : 8 + n + end]
        arr = np.frombuffer(buf, dtype=SAFETENSORS_DTYPES[meta["dtype"]]).reshape(meta["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out


def check(msg):
    """Losses of `steps` steps from tessera's initial weights and inputs."""
    t = read_safetensors(msg["path"])
    x, coords, bag_of = t.pop("x"), t.pop("coords"), t.pop("bag")
    labels = t.pop("labels").tolist()
    mean, std = t.pop("standardize.mean", None), t.pop("standardize.std", None)
    bags = [(x[bag_of == b], coords[bag_of == b], labels[b]) for b in range(len(labels))]
    cfg = {**msg["model"], "attention_dropout": msg.get("attention_dropout", 0.1)}
    tr = Trainer(cfg, msg["optimizer"], msg["grad_clip"], bags, len(bags), "cpu", False)
    t = {k.replace("attn.to_out.", "attn.to_out.0."): v for k, v in t.items()}
    tr.model.load_state_dict({**t, "mean": tr.model.mean, "inv_std": tr.model.inv_std}, strict=True)
    if mean is not None:
        tr.model.standardize_with(mean, std)
    return [tr.step(tr.bags) for _ in range(msg["steps"])]


def reply(obj):
    """One JSON line to the bench (stdout is the protocol; diagnostics go to stderr)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(threads):
    torch.set_num_threads(threads)
    try:
        import nystrom_attention  # noqa: F401  (TransMIL rows only)

        nystrom = True
    except ImportError:
        nystrom = False
    reply({
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "nystrom_attention": nystrom,
    })
    trainers = {}
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            cmd = msg["cmd"]
            if cmd == "quit":
                return
            if cmd == "setup":
                cfg = msg["model"]
                bags = [bench_bag(k, d, seed, cfg["input_dim"]) for k, d, seed in msg["bags"]]
                trainers[msg["id"]] = Trainer(
                    cfg,
                    msg["optimizer"],
                    msg["grad_clip"],
                    bags,
                    msg["batch"],
                    msg["device"],
                    msg["standardize"],
                    msg.get("alternate_labels", False),
                )
                reply({"ok": True})
            elif cmd == "steps":
                reply({"ms": trainers[msg["id"]].steps(msg["n"])})
            elif cmd == "epoch":  # from a fresh model: the first epoch of a training run
                trainers[msg["id"]].reset()
                reply({"s": trainers[msg["id"]].epoch()})
            elif cmd == "drop":
                trainers.pop(msg["id"], None)
                reply({"ok": True})
            elif cmd == "check":
                reply({"losses": check(msg)})
            else:
                reply({"error": f"unknown command {cmd}"})
        except Exception as e:  # reported to the bench, which stops with the message
            reply({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] != ["--serve"] or len(args) not in (1, 3) or (len(args) == 3 and args[1] != "--threads"):
        sys.exit(__doc__)
    serve(int(args[2]) if len(args) == 3 else 2)
