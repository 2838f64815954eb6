#!/usr/bin/env bash
# Regenerates the parity fixtures in fixtures/data/ with the pinned reference packages
# (fixtures/requirements.txt) installed into the project's .venv. Run on demand, not in CI.
#   scripts/make-fixtures.sh            # all generators
#   scripts/make-fixtures.sh scheduler  # only fixtures/gen_scheduler.py
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-libtorch.sh
grep -v '^open-clip-torch' fixtures/requirements.txt | .venv/bin/pip install --quiet -r /dev/stdin
.venv/bin/pip install --quiet --no-deps "$(grep '^open-clip-torch' fixtures/requirements.txt | cut -d' ' -f1)"
gens=("$@")
if [[ ${#gens[@]} -eq 0 ]]; then
  for f in fixtures/gen_*.py; do n=${f#fixtures/gen_}; gens+=("${n%.py}"); done
fi
for g in "${gens[@]}"; do
  echo "== fixtures/gen_$g.py"
  (cd fixtures && ../.venv/bin/python -W ignore "gen_$g.py")
done
