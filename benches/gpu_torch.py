#!/usr/bin/env python3
"""The GPU benchmark cases of benches/gpu.rs in PyTorch eager, on the same GPU.

    python3 benches/gpu_torch.py --dynn dynn_gpu.json [--out combined.json]

reads dynn's JSON (the last line of `gpu --json`), times each case it lists in PyTorch
(median of synchronised repetitions, after warm-up; TF32 off, as dynn's f32 GEMM), prints a
table with ratio = dynn time / PyTorch time (target <= 1.1) and writes the combined JSON.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = torch.device("cuda:0")


BURST = 20


def timed(f):
    """Milliseconds per run: median over bursts of BURST runs between synchronisations."""
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    samples = []
    start = time.perf_counter()
    while len(samples) < 5 or (time.perf_counter() - start < 1.0 and len(samples) < 100):
        t = time.perf_counter()
        for _ in range(BURST):
            f()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t) * 1e3 / BURST)
    samples.sort()
    return samples[len(samples) // 2]


def randn(*shape):
    return torch.randn(*shape, device=dev, dtype=torch.float32)


class Block(torch.nn.Module):
    """Pre-norm block as dynn's TransformerBlock: attention then a GELU MLP."""

    def __init__(self, dim=512, heads=8, hidden=2048):
        super().__init__()
        self.heads = heads
        self.ln1 = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.ln2 = torch.nn.LayerNorm(dim)
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        att = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5
        mask = torch.ones(s, s, device=x.device, dtype=torch.bool).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class MoeLM(torch.nn.Module):
    """The MoE LM of benches/gpu.rs's moe_train_step in PyTorch: token and position
    embeddings, pre-norm blocks of causal attention and a top-2 Mixture-of-Experts MLP
    (softmax router, capacity ceil(1.25 * tokens * 2 / experts) per expert, overflow dropped,
    outputs weighted by the router probability, Switch load-balancing loss), a final norm and
    an LM head; experts run one by one on their routed tokens, as in dynn."""

    def __init__(self, vocab=512, dim=512, heads=8, layers=4, experts=8, hidden=2048, seq=256):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(seq, dim)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            blk = torch.nn.Module()
            blk.ln1, blk.ln2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
            blk.qkv, blk.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
            blk.router = torch.nn.Linear(dim, experts, bias=False)
            blk.experts = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU("tanh"),
                                    torch.nn.Linear(hidden, dim)) for _ in range(experts))
            self.blocks.append(blk)
        self.ln_f = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab)
        self.heads, self.experts = heads, experts

    def moe(self, blk, x):
        n, e = x.shape[0], self.experts
        probs = blk.router(x).softmax(-1)
        top = probs.topk(2, dim=-1).indices
        cap = max(1, int(-(-1.25 * n * 2 // e)))
        y = torch.zeros_like(x)
        frac = []
        for i in range(e):
            toks = (top == i).any(-1).nonzero().squeeze(-1)[:cap]
            frac.append((top[:, 0] == i).float().mean())
            if toks.numel():
                y = y.index_add(0, toks, blk.experts[i](x[toks]) * probs[toks, i:i + 1])
        aux = e * (torch.stack(frac) * probs.mean(0)).sum()
        return y, aux

    def forward(self, ids, targets):
        b, s = ids.shape
        d = self.tok.embedding_dim
        x = self.tok(ids) + self.pos(torch.arange(s, device=ids.device))
        mask = torch.ones(s, s, device=ids.device, dtype=torch.bool).triu(1)
        aux = 0.0
        for blk in self.blocks:
            q, k, v = blk.qkv(blk.ln1(x)).split(d, dim=-1)
            split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)
            att = (split(q) @ split(k).transpose(-1, -2)) / (d // self.heads) ** 0.5
            att = att.masked_fill(mask, float("-inf")).softmax(-1)
            x = x + blk.proj((att @ split(v)).transpose(1, 2).reshape(b, s, d))
            y, a = self.moe(blk, blk.ln2(x).reshape(b * s, d))
            x, aux = x + y.view(b, s, d), aux + a
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(b * s, -1), targets.view(-1)) + 0.01 * aux


def case(name):
    if name.startswith("matmul_f32_"):
        n = int(name.rsplit("_", 1)[1])
        a, b = randn(n, n), randn(n, n)
        return lambda: a @ b
    if name in ("matmul_f16_4096", "matmul_bf16_4096"):
        dtype = torch.bfloat16 if name.startswith("matmul_bf16") else torch.float16
        a, b = randn(4096, 4096).to(dtype), randn(4096, 4096).to(dtype)
        return lambda: a @ b
    if name == "bmm_32x128x64x128":
        a, b = randn(32, 128, 64), randn(32, 64, 128)
        return lambda: a @ b
    if name == "add_bf16_16M":
        a, b = randn(4096, 4096).bfloat16(), randn(4096, 4096).bfloat16()
        return lambda: a + b
    if name == "gelu_f16_16M":
        a = randn(4096, 4096).half()
        return lambda: F.gelu(a, approximate="tanh")
    if name == "log_softmax_bf16_4096x1024":
        x = randn(4096, 1024).bfloat16()
        return lambda: x.log_softmax(-1)
    if name == "rms_norm_bf16_4096x1024":
        x, w = randn(4096, 1024).bfloat16(), randn(1024).bfloat16()
        return lambda: F.rms_norm(x, (1024,), w, 1e-5)
    if name.endswith("_16M"):
        a, b = randn(4096, 4096), randn(4096, 4096)
        v = torch.rand(4096, 4096, device=dev) * 1.8 + 0.2
        mask = a > b
        t = a.clone()
        m = {
            "add_16M": lambda: a + b,
            "mul_16M": lambda: a * b,
            "maximum_16M": lambda: torch.maximum(a, b),
            "add_transposed_16M": lambda: a.t() + b,
            "gt_16M": lambda: a > b,
            "where_16M": lambda: torch.where(mask, a, b),
            "masked_fill_16M": lambda: a.masked_fill(mask, 0.0),
            "contiguous_transposed_16M": lambda: a.t().contiguous(),
            "cast_f32_f64_16M": lambda: a.double(),
            "axpy_16M": lambda: t.add_(b, alpha=1e-3),
            # Adam's parameter update given m and v (torch's unfused ops).
            "adam_step_16M": lambda: t.addcdiv_(b, v.sqrt().add_(1e-8), value=-1e-3),
        }
        return m.get(name)
    x = randn(4096, 1024)
    if name == "log_softmax_4096x1024":
        return lambda: x.log_softmax(-1)
    if name == "rms_norm_4096x1024":
        w = randn(1024)
        return lambda: F.rms_norm(x, (1024,), w, 1e-5)
    if name == "sum_rows_4096x1024":
        return lambda: x.sum(-1, keepdim=True)
    if name.startswith(("h2d_", "d2h_")):
        # Both dynn cases (raw pinned copies and the memory manager's offload path through its
        # pinned host tier) are compared with PyTorch's pinned copy: non-blocking for 256 MiB
        # (bandwidth), blocking for 64 KiB (dynn's manager waits for each copy: latency).
        small = name.endswith("64KiB")
        n = (64 << 10) if small else (256 << 20)
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        gpu = torch.empty(n, dtype=torch.uint8, device=dev)
        if name.startswith("h2d_"):
            return lambda: gpu.copy_(host, non_blocking=not small)
        return lambda: host.copy_(gpu, non_blocking=not small)
    if name == "softmax_4096x1024":
        return lambda: x.softmax(-1)
    if name == "layer_norm_4096x1024":
        w, b = randn(1024), randn(1024)
        return lambda: F.layer_norm(x, (1024,), w, b, 1e-5)
    if name == "add_bcast_4096x1024":
        b = randn(1024)
        return lambda: x + b
    if name == "gelu_4096x1024":
        return lambda: F.gelu(x, approximate="tanh")
    if name == "moe_train_step":
        model = MoeLM().to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, 512, (16, 256), device=dev)
        targets = torch.randint(0, 512, (16, 256), device=dev)

        def step():
            opt.zero_grad(set_to_none=True)
            model(ids, targets).backward()
            opt.step()

        return step
    if name == "transformer_block_fwd_bwd":
        block = Block().to(dev)
        xb = randn(8, 256, 512)

        def step():
            block.zero_grad(set_to_none=True)
            block(xb).sum().backward()

        return step
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dynn", required=True)
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = [l for l in open(args.dynn).read().splitlines() if l.startswith("{")]
    dynn = json.loads(lines[-1])
    rows = []
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'case':<28} {'dynn ms':>10} {'torch ms':>10} {'ratio':>7}")
    for c in dynn["cases"]:
        try:
            f = case(c["name"])
            if f is None:  # dynn-only figures (e.g. the memory manager's move) stay in the JSON
                rows.append(dict(c))
                print(f"{c['name']:<28} {c['dynn_ms']:>10.4f}   (no PyTorch twin)")
                continue
            t = timed(f)
        except Exception as e:  # one broken case must not lose the others' figures
            print(f"{c['name']:<28} PyTorch failed: {e!r}")
            continue
        ratio = c["dynn_ms"] / t
        rows.append({**c, "torch_ms": t, "ratio": ratio})
        print(f"{c['name']:<28} {c['dynn_ms']:>10.4f} {t:>10.4f} {ratio:>7.2f}")
    out = {"device": dynn["device"], "torch": torch.__version__, "cases": rows}
    if args.out:
        json.dump(out, open(args.out, "w"), indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
