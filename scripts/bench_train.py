"""PyTorch peer for scripts/bench_train.sh: CPU training throughput of a Hugging Face model
directory (config.json) with AdamW, the same batch shape and step count as shardc's run.
Prints one JSON object: {"tokens_per_s": ..., "threads": ..., "torch": ...}."""
import json
import sys
import time

import torch
import transformers

model_dir, batch, seq, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
config = transformers.AutoConfig.from_pretrained(model_dir)
model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
x = torch.randint(0, config.vocab_size, (batch, seq))
y = torch.randint(0, config.vocab_size, (batch, seq))
times = []
for _ in range(steps + 2):
    t0 = time.perf_counter()
    logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    times.append(time.perf_counter() - t0)
times = sorted(times[2:])  # drop warm-up steps
print(json.dumps({"tokens_per_s": batch * seq / times[len(times) // 2], "threads": torch.get_num_threads(),
                  "torch": torch.__version__}))
