"""Builds the Hugging Face reference fixtures under tests/fixtures/hf/.

For each tiny model (GPT-2 with tied LM head; Llama with grouped-query attention) it writes:
  config.json, model.safetensors   the model as Hugging Face saves it
  tokens.bin                       B*T+1 tokens in llm.c's format (batch 0 of `shardc eval`)
  expected.safetensors             tokens, targets (int64 [B, T]), logits (f32 [B, T, V])
  expected_grads.safetensors       d loss / d parameter, under the checkpoint's tensor names
  train_*                          5 AdamW steps on Shakespeare (see train_reference)
  expected.json                    {"batch", "seq", "loss", "torch", "transformers"}

Run through scripts/make_fixtures.sh, which makes the venv. Deterministic: fixed seeds.
"""
import json
import os
import struct
import sys

import torch
import transformers
from safetensors.torch import save_file

B, T, V = 2, 16, 256
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf")


def randomize(model, seed):
    """Every parameter gets a non-trivial value so that a miswired bias or gain shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "ln" in name or "norm" in name:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.05 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:
                p.copy_(0.08 * noise)


def safe_open_keys(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return list(f.keys())


def write_tokens(path, tokens):
    header = [0] * 256
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", *header))
        f.write(struct.pack(f"<{len(tokens)}H", *tokens))


def build(name, model, seed):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    randomize(model, seed)
    model.eval()
    model.save_pretrained(d, safe_serialization=True)
    g = torch.Generator().manual_seed(seed + 1)
    data = torch.randint(0, V, (B * T + 1,), generator=g)
    write_tokens(os.path.join(d, "tokens.bin"), data.tolist())
    x = torch.stack([data[b * T : b * T + T] for b in range(B)])
    y = torch.stack([data[b * T + 1 : b * T + T + 1] for b in range(B)])
    model.zero_grad()
    logits = model(input_ids=x).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
    loss.backward()
    # Gradients under the checkpoint's own names (tied weights appear once, as saved).
    saved = set(safe_open_keys(os.path.join(d, "model.safetensors")))
    grads = {k: p.grad.detach().contiguous() for k, p in model.named_parameters() if k in saved}
    save_file(grads, os.path.join(d, "expected_grads.safetensors"))
    logits = logits.detach()
    save_file(
        {"tokens": x.contiguous(), "targets": y.contiguous(), "logits": logits.contiguous()},
        os.path.join(d, "expected.safetensors"),
    )
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(
            {"batch": B, "seq": T, "loss": loss.item(), "torch": torch.__version__,
             "transformers": transformers.__version__},
            f, indent=2,
        )
        f.write("\n")
    print(f"{name}: loss {loss.item():.6f}, {sum(p.numel() for p in model.parameters())} parameters")


STEPS, LR, WD, BETAS, EPS, CLIP = 5, 1e-3, 0.1, (0.9, 0.95), 1e-8, 1.0
SHAKESPEARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "data", "shakespeare.txt")


def train_reference(name, cls):
    """5 AdamW steps from the saved weights on llm.c-ordered sequential batches of Shakespeare.

    Weight decay on parameters of rank >= 2 only; gradient clipping to CLIP; constant LR.
    Writes train_tokens.bin, train_expected.json (per-step loss and grad norm) and
    train_final.safetensors (the parameters after the last step, checkpoint names).
    """
    d = os.path.join(OUT, name)
    model = cls.from_pretrained(d, attn_implementation="eager").to(torch.float32)
    model.train()
    with open(SHAKESPEARE, "rb") as f:
        data = list(f.read(STEPS * B * T + 1))
    write_tokens(os.path.join(d, "train_tokens.bin"), data)
    data = torch.tensor(data)
    decay = [p for _, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS, foreach=False)
    losses, norms = [], []
    for k in range(STEPS):
        x = torch.stack([data[(k * B + b) * T:(k * B + b) * T + T] for b in range(B)])
        y = torch.stack([data[(k * B + b) * T + 1:(k * B + b) * T + T + 1] for b in range(B)])
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(loss.item())
        norms.append(norm.item())
    saved = set(safe_open_keys(os.path.join(d, "model.safetensors")))
    final = {k: p.detach().contiguous() for k, p in model.named_parameters() if k in saved}
    save_file(final, os.path.join(d, "train_final.safetensors"))
    with open(os.path.join(d, "train_expected.json"), "w") as f:
        json.dump({"batch": B, "seq": T, "steps": STEPS, "lr": LR, "weight_decay": WD, "beta1": BETAS[0],
                   "beta2": BETAS[1], "eps": EPS, "grad_clip": CLIP, "losses": losses, "grad_norms": norms}, f, indent=2)
        f.write("\n")
    print(f"{name}: {STEPS} AdamW steps, losses {[round(l, 4) for l in losses]}")


def main():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, tie_word_embeddings=True,
    )
    build("gpt2-tiny", transformers.GPT2LMHeadModel(gpt2).to(torch.float32), 1234)
    llama = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
        attention_bias=False, mlp_bias=False,
    )
    build("llama-tiny", transformers.LlamaForCausalLM(llama).to(torch.float32), 4321)
    train_reference("gpt2-tiny", transformers.GPT2LMHeadModel)
    train_reference("llama-tiny", transformers.LlamaForCausalLM)


if __name__ == "__main__":
    sys.exit(main())
