"""The verifiable task generator and its verifier, with hand-made right and wrong answers."""

from __future__ import annotations

import pytest

from gradlens.verifiable.tasks import KINDS, Task, load_facts, make_tasks
from gradlens.verifiable.verify import is_correct, last_number

N132 = Task("arithmetic", "What is 66 plus 66? Reply with only the number.", "132", "131", True)
PARIS = Task("capitals", "What is the capital of France? Reply with only the city.", "Paris", "Berlin", False)
BIG = Task("units", "How many metres are in 3 kilometres? Reply with only the number.", "3000", "300", True)


@pytest.mark.parametrize("text", ["132", "132.", "The answer is 132", "The answer is 132.", " 132 \n", "132.0", "66 + 66 = 132",
                                  "**132**", "It is 132!"])  # fmt: skip
def test_numeric_right(text):
    assert is_correct(N132, text)


@pytest.mark.parametrize("text", ["131", "The answer is 133.", "132 minus 1 is 131", "", "one hundred thirty-two", "1320", "13 2", "-132"])
def test_numeric_wrong(text):
    assert not is_correct(N132, text)


def test_thousands_separator_and_decimals():
    assert is_correct(BIG, "3,000 metres") and is_correct(BIG, "3000.") and not is_correct(BIG, "3.000")
    assert last_number("no digits") is None and last_number("from 1,250.5 to 7") == 7.0


@pytest.mark.parametrize("text", ["Paris", "paris.", "The capital of France is Paris.", "PARIS", "It is Paris, not Lyon."])
def test_capital_right(text):
    assert is_correct(PARIS, text)


@pytest.mark.parametrize("text", ["Berlin", "Paris or Berlin", "Lyon", "Parisian", "", "The capital of France is Marseille."])
def test_capital_wrong(text):
    assert not is_correct(PARIS, text)


def test_multiword_capital_is_not_confused_with_its_parts():
    city = Task("capitals", "What is the capital of Mexico?", "Mexico City", "Lima", False)
    assert is_correct(city, "The capital of Mexico is Mexico City.") and not is_correct(city, "Mexico")


def test_tasks_are_reproducible_distinct_and_correct_by_construction():
    tasks = make_tasks(40, seed=7)
    assert tasks == make_tasks(40, seed=7) and tasks != make_tasks(40, seed=8)
    assert len({t.question for t in tasks}) == 40 and {t.kind for t in tasks} == set(KINDS)
    for t in tasks:  # the verifier accepts each reference answer and refuses each wrong one
        assert is_correct(t, t.answer) and not is_correct(t, t.wrong), t
        assert t.answer != t.wrong


def test_letter_counts_and_capitals_come_from_their_sources():
    facts = dict(load_facts())
    for t in make_tasks(40, seed=1):
        if t.kind == "letters":
            letter, word = t.question.split("'")[1], t.question.split("'")[3]
            assert int(t.answer) == word.count(letter)
        if t.kind == "capitals":
            assert facts[t.question.split("capital of ")[1].split("?")[0]] == t.answer
