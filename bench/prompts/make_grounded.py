"""The input-grounded prompt set: tasks whose answers copy much of their input (issue 13).

    python3 bench/prompts/make_grounded.py > bench/prompts/grounded.jsonl

From the wheels only (no download): each HumanEval problem's full function (its prompt plus its
canonical solution) with one of three edit requests in turn: add type hints and a docstring,
rename a variable, or rewrite it with comments. Answers to these repeat most of the given code, which
is where prompt-lookup (n-gram) drafts pay. Deterministic: the same file every time. HumanEval is an
evaluation set here, never training data.
"""

from __future__ import annotations

import gzip
import json
import re

from orthrus.datasets import data_file

TASKS = (
    "Rewrite this Python function with full type hints and a Google-style docstring. "
    "Reply with the code only.\n\n```python\n{code}```",
    "Rename the variable `{var}` to `{new}` everywhere in this Python function and reply with the "
    "whole function, unchanged otherwise.\n\n```python\n{code}```",
    "Repeat this Python function exactly, adding a short comment above each line that explains it.\n\n"
    "```python\n{code}```",
)


def main() -> None:
    with gzip.open(data_file("humaneval"), "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    for i, p in enumerate(problems):
        code = p["prompt"] + p["canonical_solution"]
        names = [n for n in re.findall(r"\b([a-z_][a-z0-9_]*)\s*=[^=]", p["canonical_solution"]) if len(n) > 1]
        task = TASKS[i % 3] if (i % 3 != 1 or names) else TASKS[0]
        var = names[0] if names else ""
        prompt = task.format(code=code, var=var, new=f"{var}_value")
        print(json.dumps({"id": p["task_id"], "prompt": prompt}))


if __name__ == "__main__":
    main()
