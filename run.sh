#!/usr/bin/env bash
# The project's single entry point (see README.md).
#   bash run.sh                  main job: the MoME demo on the phantom data (the demo writes its data if absent)
#   bash run.sh test [ARGS]      set up .venv, lint, run the pytest suite (ARGS go to pytest, e.g. -m slow)
#   bash run.sh data             write the demo phantom datasets into data/demo if absent
#   bash run.sh bench            run the benchmark scripts and print their tables
#   bash run.sh moe_missing      demo of moe_missing (likewise brainsegfounder, sam_med3d_moe)
#   bash run.sh setup            only create/update .venv
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
DEMO_DIR=${DEMO_DIR:-$ROOT/data/demo}
RUNS_DIR=${RUNS_DIR:-$ROOT/runs}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

setup() {
    # Python 3.11 first: the CPU wheel of torch 2.13.0 on this machine's disk is built for it.
    if [ ! -x "$PY" ]; then
        local base
        base=$(command -v python3.11 || command -v python3)
        echo "[run.sh] creating $VENV with $base"
        "$base" -m venv "$VENV"
    fi
    # Reinstall only when a requirements file changed.
    local stamp=$VENV/.requirements.sha
    local want
    want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "[run.sh] installing requirements into $VENV"
        "$PY" -m pip install -q -r requirements.txt
        # --no-deps: the extras' own specs would pull a multi-GB CUDA torch (see requirements-dev.txt)
        "$PY" -m pip install -q --no-deps -r requirements-dev.txt
        echo "$want" > "$stamp"
    fi
}

make_data() {
    "$PY" -m shared.phantom --out "$DEMO_DIR" --seed 0
}

run_tests() {
    "$PY" -m ruff check .
    "$PY" -m ruff format --check .
    set +e
    "$PY" -m pytest "$@"
    local rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
        echo "[run.sh] pytest collected no tests: treating that as a failure" >&2
        return 1
    fi
    return "$rc"
}

run_bench() {
    for script in tests/bench_*.py; do
        echo
        echo "== $script"
        "$PY" "$script"
    done
}

method_demo() {
    local package=$1
    if [ ! -f "$package/demo.py" ]; then
        echo "error: the $package demo is not in this checkout yet" >&2
        exit 2
    fi
    "$PY" -m "$package.demo" --data "$DEMO_DIR" --runs "$RUNS_DIR/$package"
}

cmd=${1:-main}
[ $# -gt 0 ] && shift
case "$cmd" in
    # each demo writes the phantom datasets it needs (and skips complete ones)
    main) setup; method_demo mome ;;
    mome|moe_missing|brainsegfounder|sam_med3d_moe) setup; method_demo "$cmd" ;;
    test) setup; run_tests "$@" ;;
    data) setup; make_data ;;
    bench) setup; run_bench ;;
    setup) setup ;;
    *)
        echo "error: unknown command '$cmd'; use one of: test, data, bench, setup, mome, moe_missing," \
            "brainsegfounder, sam_med3d_moe (no argument: the MoME demo)" >&2
        exit 2
        ;;
esac
