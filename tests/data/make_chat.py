"""Writes chat.jsonl: 320 short conversations in the "messages" format (lorakit's own text, fixed seed).

    python tests/data/make_chat.py

Kinds: sums and products, word opposites, letters of a word, colour mixing, unit conversions,
and two-turn follow-ups; a quarter carry a system turn. The replies follow fixed phrasings, so a
small model learns them in a few dozen steps (the held-out loss on assistant tokens falls).
"""

import json
import random
from pathlib import Path

OPPOSITES = [("hot", "cold"), ("up", "down"), ("early", "late"), ("full", "empty"), ("light", "dark"),
             ("open", "closed"), ("fast", "slow"), ("wet", "dry"), ("loud", "quiet"), ("young", "old"),
             ("high", "low"), ("hard", "soft"), ("near", "far"), ("thick", "thin"), ("rich", "poor")]
WORDS = ["river", "garden", "pencil", "window", "candle", "forest", "basket", "ladder", "orange", "planet",
         "bridge", "rocket", "silver", "marble", "jacket", "pepper", "violin", "harbor", "meadow", "puzzle"]
COLOURS = [("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"),
           ("red", "white", "pink"), ("black", "white", "grey"), ("blue", "white", "light blue")]
SYSTEMS = ["You are a concise assistant.", "Answer in one short sentence.", "You are a patient tutor."]


def turn(kind: str, rng: random.Random) -> tuple[str, str]:
    if kind == "sum":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == "product":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
    if kind == "opposite":
        w, o = rng.choice(OPPOSITES)
        return f"What is the opposite of \"{w}\"?", f"The opposite of \"{w}\" is \"{o}\"."
    if kind == "letters":
        w = rng.choice(WORDS)
        return f"How many letters are in the word \"{w}\"?", f"The word \"{w}\" has {len(w)} letters."
    if kind == "colour":
        a, b, c = rng.choice(COLOURS)
        return f"What do you get when you mix {a} and {b}?", f"Mixing {a} and {b} gives {c}."
    n = rng.randint(2, 40)
    return f"How many minutes are in {n} hours?", f"{n} hours are {n * 60} minutes."


def main() -> None:
    rng = random.Random(17)
    kinds = ["sum", "product", "opposite", "letters", "colour", "minutes"]
    rows = []
    for i in range(320):
        messages = []
        for _ in range(1 if i % 3 else 2):
            q, a = turn(rng.choice(kinds), rng)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        row = {"messages": messages}
        if i % 4 == 0:
            row = {"system": rng.choice(SYSTEMS), **row}
        rows.append(row)
    out = Path(__file__).with_name("chat.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
