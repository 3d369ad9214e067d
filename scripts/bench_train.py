"""PyTorch peer for scripts/bench_train.sh: CPU training throughput of the GPT-2-style model a
config.json describes (n_embd, n_layer, n_head, vocab_size; tanh GELU, LayerNorm, tied
embeddings as GPT-2), written in plain PyTorch, with fused-free AdamW and gradient clipping,
f32, in eager mode or under torch.compile. Usage: bench_train.py CONFIG BATCH SEQ STEPS MODE.
Prints one JSON object: {"tokens_per_s": ..., "threads": ..., "torch": ..., "mode": ...}."""
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

config_path, batch, seq, steps, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
cfg = json.load(open(config_path))
d, layers, heads, vocab = cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["vocab_size"]
torch.manual_seed(0)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // heads)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))


model = GPT()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)


def step(x, y):
    loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


if mode == "compile":
    model = torch.compile(model)
x = torch.randint(0, vocab, (batch, seq))
y = torch.randint(0, vocab, (batch, seq))
times = []
for _ in range(steps + 3):
    t0 = time.perf_counter()
    step(x, y)
    times.append(time.perf_counter() - t0)
times = sorted(times[3:])  # drop warm-up (and compilation) steps
print(json.dumps({"tokens_per_s": batch * seq / times[len(times) // 2], "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "mode": mode}))
