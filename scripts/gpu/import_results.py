"""Bring a finished GPU job's files into the repository (run here, from the repository root).

    python3 scripts/gpu/import_results.py DIR [--prefix h100] [--dry-run]

DIR holds what the device calls returned: ``results.tar.gz`` (or ``partial.tar.gz``),
``adapter.safetensors`` and ``adapter_config.json``. This

* copies every benchmark ``res/NAME.{json,png}`` to ``bench/results/PREFIX_NAME.{json,png}``;
* installs the adapter into ``orthrus/adapters/smollm2-135m/`` (after checking it loads onto the
  default model and is at most 16 MiB);
* writes ``orthrus/adapters/smollm2-135m/TRAINING.md`` from the job's own records (GPU, stage times,
  the distillation and training summaries, training settings, held-out acceptance);
* prints the README's headline table (markdown) from the benchmark JSONs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from orthrus.bench.report import markdown_table

REPO = Path(__file__).resolve().parents[2]
ADAPTER_DIR = REPO / "orthrus" / "adapters" / "smollm2-135m"
MAX_ADAPTER_BYTES = 16 * 1024 * 1024


def _last_json(path: Path) -> dict | None:
    """The last line of a log that is a JSON object (our commands print their summary so)."""
    if not path.is_file():
        return None
    for line in reversed(path.read_text(errors="replace").split("\n")):  # not splitlines(): U+2028 is text
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _evals(log_jsonl: Path) -> list[dict]:
    if not log_jsonl.is_file():
        return []
    from orthrus.jsonl import iter_jsonl

    return [r for _, r in iter_jsonl(log_jsonl, "training log") if "eval_acceptance_length" in r]


def training_md(work: Path, env: str, status: str) -> str:
    distill = _last_json(work / "distill.log") or {}
    commands = (work / "commands.txt").read_text().strip() if (work / "commands.txt").is_file() else "(not recorded)"
    out = ["# How the default adapter was trained", "",
           "Made by `scripts/gpu/pipeline.sh` (see `scripts/gpu/README.md`), unattended, in one job.", "",
           "## Machine", "", "```", env.strip(), "```", "", "## Stages (wall clock, exit codes)", "",
           "```", status.strip(), "```", "", "## Commands, as run", "", "```", commands, "```", "",
           "## Data", ""]
    if distill:
        out += [f"`orthrus distill` (ShareGPT first user turns, greedy, fp32): {distill.get('rows')} rows, "
                f"{distill.get('tokens')} response tokens in {distill.get('seconds')} s "
                f"({distill.get('tokens_per_second')} tok/s); {distill.get('skipped_long')} prompts over "
                "512 tokens skipped.", ""]
    for kind in ("lora64", "full"):
        cfg_path = work / kind / "train_config.json"
        summary = _last_json(work / f"train_{kind}.log") or {}
        out += [f"## `{kind}`", ""]
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            keys = ("adapter_kind", "block_size", "seq_len", "batch_size", "anchors_per_seq", "lr", "max_minutes",
                    "dtype", "use_flex", "epochs")
            out += ["Settings: " + ", ".join(f"`{k}` = {cfg.get(k)}" for k in keys if k in cfg) + ".", ""]
        if summary:
            out += [f"{summary.get('steps')} steps in {summary.get('seconds')} s; loss {summary.get('first_loss')} "
                    f"-> {summary.get('last_loss')}.", ""]
        evals = _evals(work / kind / "log.jsonl")
        if evals:
            out += ["Held-out evaluations (last 2% of the rows):", "", "```"]
            out += [json.dumps(e) for e in evals]
            out += ["```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--prefix", default="h100", help="file name prefix under bench/results/ (default: h100)")
    ap.add_argument("--dry-run", action="store_true", help="print what would be done; write nothing")
    args = ap.parse_args(argv)
    tars = [args.dir / n for n in ("results.tar.gz", "partial.tar.gz") if (args.dir / n).is_file()]
    if not tars:
        print(f"error: no results.tar.gz or partial.tar.gz in {args.dir}", file=sys.stderr)
        return 2
    if not re.fullmatch(r"[A-Za-z0-9_]+", args.prefix):
        print(f"error: --prefix must be letters, digits and _, got {args.prefix!r}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with tarfile.open(tars[0]) as tar:
            tar.extractall(work, filter="data")
        results = {}
        for js in sorted((work / "res").glob("*.json")):
            results[js.stem] = json.loads(js.read_text())
            for src in (js, js.with_suffix(".png")):
                dst = REPO / "bench" / "results" / f"{args.prefix}_{src.name}"
                print(f"{src.name} -> {dst.relative_to(REPO)}")
                if not args.dry_run and src.is_file():
                    shutil.copyfile(src, dst)
        weights, config = args.dir / "adapter.safetensors", args.dir / "adapter_config.json"
        if weights.is_file() and config.is_file():
            size = weights.stat().st_size
            if size > MAX_ADAPTER_BYTES:
                print(f"error: the adapter is {size} bytes, over 16 MiB: not installed", file=sys.stderr)
                return 2
            from orthrus.adapter import DiffusionAdapter
            from orthrus.models.loading import load_base

            base = load_base("smollm2-135m")
            DiffusionAdapter.load(args.dir, base.model, base.fingerprint)  # refuses a foreign or corrupt one
            print(f"adapter ({size / 2**20:.1f} MiB) -> {ADAPTER_DIR.relative_to(REPO)}/")
            env = (work / "env.log").read_text() if (work / "env.log").is_file() else "(no env.log)"
            status = (work / "status").read_text() if (work / "status").is_file() else "(no status)"
            text = training_md(work, env, status)
            if not args.dry_run:
                ADAPTER_DIR.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(weights, ADAPTER_DIR / weights.name)
                shutil.copyfile(config, ADAPTER_DIR / config.name)
                (ADAPTER_DIR / "TRAINING.md").write_text(text + "\n")
        else:
            print("no adapter files: none installed")
    print()
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
