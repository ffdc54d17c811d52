"""Time chat_rows (lorakit train's data preparation, a library call) on one conversation of 2000 user/assistant turn
pairs with --max-length 256 (issue 33, item 14: it rendered every prefix twice, quadratic in the turns).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/long_conversation.py
"""
import time
import lorakit
from lorakit.train import chat as C
from lorakit.train.models import load_tokenizer

tok = load_tokenizer("builtin:smollm2")
turns = []
for i in range(2000):
    turns += [{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"},
              {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]
t = time.perf_counter()
made = C.chat_rows(tok, [{"messages": turns}], 256)
print(f"{lorakit.__file__}: {time.perf_counter() - t:.2f} s, {len(made.rows)} row(s), "
      f"{sum(l != -100 for l in made.rows[0]['labels'])} trained tokens")
