"""A tiny Llama from transformers, switched to dilated attention, trained a few steps, then sampled.

    pip install 'longnet-torch[hf]'
    python examples/hf_llama_dilated.py

Any transformers model written against its attention interface (Llama, Mistral, Qwen2, ...) takes
dilated attention the same way: register it once, put the pattern in the config, and ask for
``attn_implementation="dilated"``.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import longnet.hf


def main() -> None:
    torch.manual_seed(0)
    longnet.hf.register()  # adds "dilated" to transformers' attention and mask registries

    config = LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=None, pad_token_id=0,
        segment_lengths=[8, 16, 32], dilation_rates=[1, 2, 4],  # the dilated pattern
    )
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("dilated")  # or from_pretrained(..., attn_implementation=...)

    # a toy task: continue the sequence 1, 2, ..., 31, 1, 2, ... from any starting point
    def batch(size: int = 16, length: int = 64) -> torch.Tensor:
        start = torch.randint(0, 31, (size, 1))
        return (start + torch.arange(length)) % 31 + 1

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        x = batch()
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == 59:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    model.eval()
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    cache = longnet.hf.DilatedCache(model.config)  # bounded: what later queries can read
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=20, do_sample=False, cache=cache)
    print("prompt   ", prompt[0].tolist())
    print("generated", out[0, prompt.shape[1]:].tolist())
    print(f"cache    {cache.nbytes:,} bytes ({cache.slots_per_head} keys per head and layer)")


if __name__ == "__main__":
    main()
