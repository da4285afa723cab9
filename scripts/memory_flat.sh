#!/usr/bin/env bash
# Memory of `mirgen run` from 1k to 100k targets (issue 6): the simulation
# preset (no model cost), rounds 0..1, window 8, run with 1 and with 2
# workers. "Per worker" is what the second worker adds to the process's peak
# during the dataflow; the rest is shared per process (the corpus index and
# the target list), and finalize (process 0) streams one part and one data
# file at a time.
# Usage: scripts/memory_flat.sh [SIZES...]   (default: 1000 10000 100000)
# Needs: a Python with Pillow (MIRGEN_PYTHON, default python3) and GNU time.
# Writes a markdown table to stdout; work files under ${MEMFLAT_DIR:-/tmp/mirgen-memflat}.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=("${@:-1000 10000 100000}")
[ $# -eq 0 ] && SIZES=(1000 10000 100000)
PY="${MIRGEN_PYTHON:-python3}"
DIR="${MEMFLAT_DIR:-/tmp/mirgen-memflat}"
cargo build -q -p mirgen
BIN=target/debug/mirgen
echo "| targets | index vectors MiB | peak RSS during dataflow, 1 worker | 2 workers | per worker (2w - 1w) | peak after finalize (2w) | wall s (2w) |"
echo "|---|---|---|---|---|---|---|"
for n in "${SIZES[@]}"; do
  corpus="$DIR/corpus-$n"
  if [ ! -f "$corpus/.complete" ]; then
    rm -rf "$corpus" && mkdir -p "$corpus"
    "$PY" - "$corpus" "$n" <<'PYEOF'
import sys, os
from PIL import Image
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    sub = os.path.join(root, f"{i // 1000:03d}")
    os.makedirs(sub, exist_ok=True)
    Image.new("RGB", (8, 8), ((i * 7) % 256, (i // 256) % 256, (i * 13) % 256)).save(os.path.join(sub, f"{i:06d}.png"))
open(os.path.join(root, ".complete"), "w").close()
PYEOF
  fi
  cat > "$DIR/job-$n.toml" <<TOML
[run]
rounds = 1
seed = 0
[corpus]
root = "$corpus"
[models.vlm]
preset = "simulation"
[models.generator]
preset = "simulation"
[models.embedder]
preset = "simulation"
[output]
shard_rows = 20000
[batch]
window = 8
TOML
  declare -A during
  for w in 1 2; do
    out="$DIR/out-$n-w$w"
    rm -rf "$out"
    start=$(date +%s.%N)
    "$BIN" run --config "$DIR/job-$n.toml" --output "$out" -w "$w" --progress none \
      > "$DIR/run-$n-w$w.log" 2> "$DIR/run-$n-w$w.err"
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    test -f "$out/manifest.json"
    during[$w]=$(grep -o "peak RSS [0-9]* MiB after the dataflow" "$DIR/run-$n-w$w.err" | awk '{print $3}')
    final=$(grep -o "[0-9]* MiB after finalize" "$DIR/run-$n-w$w.err" | awk '{print $1}')
  done
  index_mib=$(echo "$n * 32 * 4 / 1048576" | bc -l)
  printf "| %d | %.1f | %d | %d | %d | %d | %.1f |\n" "$n" "$index_mib" "${during[1]}" "${during[2]}" \
    $((during[2] - during[1])) "$final" "$wall"
done
