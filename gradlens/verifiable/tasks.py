"""Prompts whose answers a program can check, generated from a seed (nothing is downloaded).

Four kinds, drawn in turn: arithmetic, unit conversions, counting a letter in a
word, and capitals from ``facts.csv`` (shipped with gradlens). Each task carries
its answer and one plausible wrong answer (an off-by-a-little number, another
capital), which the off-policy pairs use as the rejected completion.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from importlib import resources

KINDS = ("arithmetic", "units", "letters", "capitals")
NUMBER_ONLY = "Reply with only the number."

# (big unit, small unit, small units per big unit)
UNITS = (("metres", "centimetres", 100), ("kilometres", "metres", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60),
         ("kilograms", "grams", 1000), ("days", "hours", 24), ("weeks", "days", 7), ("litres", "millilitres", 1000))  # fmt: skip
WORDS = ("strawberry", "banana", "mississippi", "committee", "bookkeeper", "parallel", "assessment", "coffee", "balloon",
         "letter", "pepper", "success", "address", "grammar", "occurrence", "tomorrow", "raspberry", "giraffe", "hippopotamus",
         "necessary", "cinnamon", "possession", "accommodate", "millennium", "broccoli", "vacuum", "embarrass", "tattoo")  # fmt: skip


@dataclass(frozen=True)
class Task:
    kind: str
    question: str     # the user's message, before the chat template
    answer: str       # the canonical correct answer
    wrong: str        # a plausible wrong answer
    numeric: bool


def load_facts() -> list[tuple[str, str]]:
    """(country, capital) rows of the shipped table."""
    text = resources.files(__package__).joinpath("facts.csv").read_text(encoding="utf-8")
    return [(row["country"], row["capital"]) for row in csv.DictReader(text.splitlines())]


def _near(rng: random.Random, value: int) -> str:
    """A wrong number close to ``value``: the kind of slip a model makes."""
    return str(value + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if value + d >= 0]))


def arithmetic(rng: random.Random) -> Task:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "-" and b > a:
            a, b = b, a
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    shown = {"*": "times", "+": "plus", "-": "minus"}[op]
    return Task("arithmetic", f"What is {a} {shown} {b}? {NUMBER_ONLY}", str(value), _near(rng, value), True)


def units(rng: random.Random) -> Task:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 9)
    value = n * factor
    wrong = str(n * factor // 10 if factor >= 100 else n * factor + factor)
    return Task("units", f"How many {small} are in {n} {big}? {NUMBER_ONLY}", str(value), wrong, True)


def letters(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    value = word.count(letter)
    return Task("letters", f"How many times does the letter '{letter}' appear in the word '{word}'? {NUMBER_ONLY}", str(value), str(value + 1), True)


def capitals(rng: random.Random, facts: list[tuple[str, str]]) -> Task:
    (country, capital), (_, other) = rng.sample(facts, 2)
    return Task("capitals", f"What is the capital of {country}? Reply with only the city.", capital, other, False)


def make_tasks(n: int, seed: int) -> list[Task]:
    """``n`` distinct tasks, the kinds in turn, reproducible from ``seed``."""
    rng, facts = random.Random(seed), load_facts()
    makers = {"arithmetic": arithmetic, "units": units, "letters": letters, "capitals": lambda r: capitals(r, facts)}
    tasks, seen = [], set()
    for attempt in range(50 * n):
        if len(tasks) == n:
            break
        task = makers[KINDS[len(tasks) % len(KINDS)]](rng)
        if task.question not in seen:
            seen.add(task.question)
            tasks.append(task)
    if len(tasks) < n:
        raise ValueError(f"cannot make {n} distinct tasks (the generators have fewer)")
    return tasks
