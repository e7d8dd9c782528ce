#!/usr/bin/env bash
# Do the declared dependency floors work? Not part of CI (it installs a second environment).
#
#   bash tools/check_floor.sh            # from the repository root or anywhere
#
# 1. a fresh virtual environment, .venv-floor (removed and recreated each run);
# 2. every dependency that `pip install -e ".[dev]"` pulls in directly pinned to the oldest
#    release at or above its declared floor (tools/floors.py reads pyproject.toml), the
#    packages these need left to pip;
# 3. the fast tests (-m "not slow and not distributed and not measurement"), then the versions
#    it ran with.
# torch and torchvision are not pinned to their floors: releases that old are multi-GB CUDA
# downloads here, and the machines' pip is capped to the torch/torchvision that lie on disk
# (2.14.1 / 0.29.1), so pip takes that pair; their floors in pyproject.toml are untested.
# A floor that fails to install or to pass is raised in pyproject.toml (and README's "Tested
# versions" paragraph and finegrain/compat.py TESTED record the versions that passed).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
rm -rf .venv-floor
python -m venv .venv-floor
. .venv-floor/bin/activate
python tools/floors.py pyproject.toml > .venv-floor/floors.txt
echo "floors (pip constraints):" $(cat .venv-floor/floors.txt)
python -m pip install -q -e ".[dev]" -c .venv-floor/floors.txt
echo "installed in $((SECONDS - start)) s"
set +e
python -m pytest -q -n 2 -m "not slow and not distributed and not measurement" -p no:cacheprovider
rc=$?
set -e
names=$(sed 's/==.*//; s/[-_.]/[-_.]/g' .venv-floor/floors.txt | paste -sd'|')
echo "tested with:" $(python -m pip list --format=freeze 2>/dev/null \
    | grep -iE "^($names|torch|torchvision|tokenizers)==" | tr '\n' ' ')
echo "floor check: $([ "$rc" = 0 ] && echo PASSED || echo "FAILED (pytest exit $rc)")" \
    "in $((SECONDS - start)) s"
exit "$rc"
