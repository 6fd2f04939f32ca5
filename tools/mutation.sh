#!/usr/bin/env bash
# Mutation testing of one method package's core modules (`make mutation PKG=<package>`).
#
# mutmut 3 mutates the modules listed in tests/mutation/<package>.cfg and, for every mutant,
# runs the package's fast tests that cover the mutated function. It works in a scratch copy of
# the committed tree (git archive HEAD), never in this checkout. Results: tests/MUTATION.md.
# A package takes from ~10 minutes (dynamic_rcnn) to ~2 hours (rdsnet) on two cores: run it
# in the background, one package at a time.
set -euo pipefail
pkg=${1:?usage: tools/mutation.sh PACKAGE (one of: $(cd "$(dirname "$0")/../tests/mutation" && ls | sed 's/\.cfg$//' | tr '\n' ' '))}
root=$(cd "$(dirname "$0")/.." && pwd)
cfg="$root/tests/mutation/$pkg.cfg"
[ -f "$cfg" ] || { echo "no mutation scope for '$pkg' (tests/mutation/$pkg.cfg)" >&2; exit 2; }
PY=${PYTHON:-python3}
scratch=$(mktemp -d)
git -C "$root" archive HEAD | tar -x -C "$scratch"
cp "$cfg" "$scratch/setup.cfg"
cd "$scratch"
echo "mutation testing $pkg in $scratch"
export TEST_NUM_THREADS=1 OMP_NUM_THREADS=1 PYTHONPATH="$scratch/mutants"
start=$SECONDS
# In a fresh copy the first run creates mutants/ after Python has cached it as missing, so its
# test run imports the installed package and finds no test for any mutant; the second run
# reuses the generated mutants and tests them.
"$PY" -m mutmut run --max-children 1 || true
"$PY" -m mutmut run --max-children 1
mkdir -p "$root/output"
"$PY" -m mutmut results --all true | tee "$root/output/mutation_$pkg.txt"
echo "wall time: $((SECONDS - start)) s; scratch copy left in $scratch"
