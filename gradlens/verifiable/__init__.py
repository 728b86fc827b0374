"""Preference data with answers a program can check: task generation, the verifier, and on-policy pairs.

``tasks`` makes prompts with known answers (arithmetic, unit conversions, letter
counts, facts from ``facts.csv``), ``verify`` judges a completion against the
answer, and ``sampling`` turns a model's own samples into preference pairs.
"""
