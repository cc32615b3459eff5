"""Write ShareGPT prompts past those of ../shared/data/make_prompts.py, for more distilled rows.

Same filter as that file (orthrus.train.data.sharegpt_prompts: first user turns, ids are indices in
the ShareGPT file's array, from index 8000 on, at most 1500 characters), skipping the first
``--skip`` such prompts (default 5000: the ones that file writes, all distilled by now, see
README.md here) and writing the next ``--count``. Run from the project root:
    python3 distilled/make_prompts.py > runs/data/prompts2.jsonl
"""
import argparse
import json
import sys

from orthrus.train.data import sharegpt_prompts

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--skip", type=int, default=5000, help="prompts passing the filter to skip (default 5000)")
p.add_argument("--count", type=int, default=5000, help="prompts to write (default 5000)")
args = p.parse_args()
n = 0
for idx, text in sharegpt_prompts():
    if idx < 8000 or len(text) > 1500:
        continue
    n += 1
    if n <= args.skip:
        continue
    sys.stdout.write(json.dumps({"id": idx, "prompt": text}, ensure_ascii=False) + "\n")
    if n >= args.skip + args.count:
        break
