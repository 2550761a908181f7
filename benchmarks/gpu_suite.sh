#!/usr/bin/env bash
# The GPU suite from a clean checkout: finds or makes the Python environment, then runs
# benchmarks/gpu_suite.py with the arguments given (see its docstring; --dry-run checks the plan on
# the CPU). The environment, in order:
#   1. $GPU_SUITE_PYTHON, when set (used as is: nothing installed);
#   2. .venv, as `make install-dev` leaves it (.venv/.installed-dev or .venv/.installed);
#   3. otherwise .venv is made as the Makefile makes it (python3 -m venv; pip install -e '.[dev]', or
#      the export extra alone, which is all the suite needs, when the dev extras do not install;
#      GPU_SUITE_EXTRAS=export asks for the export extra straight away: a smaller download);
#   4. when nothing installs (no package registry): a python3 that already has torch, transformers
#      and peft, with the checkout on PYTHONPATH.
# The suite always runs, and says in its summary (part "environment") which of these it got; the
# one-time install is not part of its time budget.
set -u
cd "$(dirname "$0")/.."

PYTHON3=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${GPU_SUITE_EXTRAS:-dev}
PIP_NET=(--timeout 30 --retries 2)
say() { echo "[gpu-suite.sh] $*" >&2; }
has_stack() { "$1" -c "import torch, transformers, peft" >/dev/null 2>&1; }

status=ok
if [ -n "${GPU_SUITE_PYTHON:-}" ]; then
    python=$GPU_SUITE_PYTHON
    reason="GPU_SUITE_PYTHON=$python, used as is"
elif [ -x "$VENV/bin/python" ] && { [ -e "$VENV/.installed-dev" ] || [ -e "$VENV/.installed" ]; }; then
    python=$VENV/bin/python
    reason="the existing $VENV"
else
    started=$(date +%s)
    say "no installed $VENV: making it as 'make install-dev' does (pip install -e '.[$EXTRAS]')"
    if "$PYTHON3" -m venv "$VENV" && "$VENV/bin/pip" install --quiet "${PIP_NET[@]}" -e ".[$EXTRAS]"; then
        if [ "$EXTRAS" = dev ]; then touch "$VENV/.installed-dev"; fi
        touch "$VENV/.installed"
        python=$VENV/bin/python
        reason="made $VENV with pip install -e '.[$EXTRAS]' in $(( $(date +%s) - started )) s"
    elif [ -x "$VENV/bin/pip" ] && "$VENV/bin/pip" install --quiet "${PIP_NET[@]}" -e '.[export]'; then
        touch "$VENV/.installed"
        python=$VENV/bin/python
        reason="made $VENV with pip install -e '.[export]' in $(( $(date +%s) - started )) s (the dev extras did not install)"
    elif has_stack "$PYTHON3"; then
        python=$(command -v "$PYTHON3")
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
        status=skipped
        reason="nothing installed (no package registry?): $python's own torch, transformers and peft, dinotune from the checkout"
    else
        python=$PYTHON3
        status=failed
        reason="could not install into $VENV and $PYTHON3 has no torch / transformers / peft: nothing can be measured"
    fi
fi
say "python: $python ($reason)"
export GPU_SUITE_ENV_STATUS=$status GPU_SUITE_ENV_REASON=$reason
exec "$python" benchmarks/gpu_suite.py "$@"
