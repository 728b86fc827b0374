"""Judge a completion against a task's answer.

Numbers: the completion's last number is its answer (``"12 + 30 = 42"`` answers 42),
so "132", "132.", "The answer is 132" and "132.0" all count, and a completion that
ends on another number does not. Thousands separators are read ("1,000").
Words (capitals): the answer must occur as a whole word, case and accents aside,
and no other capital from the table may occur ("Paris, not Lyon" is right; "Paris
or Berlin" is not).
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from .tasks import Task, load_facts

NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def last_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()


@lru_cache(maxsize=1)
def _capitals() -> tuple[str, ...]:
    return tuple(capital for _, capital in load_facts())


def _names(text: str, name: str) -> bool:
    return re.search(rf"(?<![a-z]){re.escape(_fold(name))}(?![a-z])", _fold(text)) is not None


def is_correct(task: Task, completion: str) -> bool:
    if task.numeric:
        value = last_number(completion)
        return value is not None and value == float(task.answer)
    if not _names(completion, task.answer):
        return False
    return not any(_names(completion, other) for other in _capitals() if other != task.answer and not _names(task.answer, other))
