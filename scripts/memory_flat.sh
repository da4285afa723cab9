#!/usr/bin/env bash
# Memory of `mirgen run` from 1k to 100k targets (issue 6): the simulation
# preset (hashed stand-ins, NOT models: no model cost), rounds 0..1, window 8,
# run with 1 and with 2 workers. "Per worker" is what the second worker adds
# to the process's peak during the dataflow; the rest is shared per process
# (the corpus index and the target list), and finalize (process 0) streams
# one part and one data file at a time. Peaks are the process's VmHWM as
# `mirgen run` prints it ("memory: process peak RSS ...").
#
# By default the targets are the whole corpus (corpus size = targets, so the
# replicated index grows with them). MEMFLAT_CORPUS=N fixes the corpus at N
# images and samples the targets from it (`[targets] source = "sample"`),
# which separates what grows with targets from what grows with the corpus.
#
# Usage: scripts/memory_flat.sh [SIZES...]   (default: 1000 10000 100000)
#        MEMFLAT_CORPUS=100000 scripts/memory_flat.sh 1000 10000
# Needs: python3 (standard library only; MIRGEN_PYTHON to choose one) and bc.
# Writes a markdown table to stdout; work files under ${MEMFLAT_DIR:-/tmp/mirgen-memflat}.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=("$@")
[ $# -eq 0 ] && SIZES=(1000 10000 100000)
FIXED="${MEMFLAT_CORPUS:-}"
PY="${MIRGEN_PYTHON:-python3}"
DIR="${MEMFLAT_DIR:-/tmp/mirgen-memflat}"
# MIRGEN_BIN=path: measure that binary (no build); default: build and use target/debug/mirgen
if [ -n "${MIRGEN_BIN:-}" ]; then
  BIN="$MIRGEN_BIN"
else
  cargo build -q -p mirgen
  BIN=target/debug/mirgen
fi
echo "| targets | corpus | index vectors MiB | peak RSS during dataflow, 1 worker | 2 workers | per worker (2w - 1w) | peak after finalize (2w) | wall s (2w) |"
echo "|---|---|---|---|---|---|---|---|"
for n in "${SIZES[@]}"; do
  size="${FIXED:-$n}"
  corpus="$DIR/corpus-$size"
  if [ -n "$FIXED" ]; then
    tag="c$FIXED-$n"
    targets=$'[targets]\nsource = "sample"\ncount = '"$n"
  else
    tag="$n"
    targets=""
  fi
  if [ ! -f "$corpus/.complete" ]; then
    rm -rf "$corpus" && mkdir -p "$corpus"
    "$PY" - "$corpus" "$size" <<'PYEOF'
import os, struct, sys, zlib
root, n = sys.argv[1], int(sys.argv[2])
def chunk(kind, data):
    c = kind + data
    return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)
for i in range(n):
    sub = os.path.join(root, f"{i // 1000:03d}")
    os.makedirs(sub, exist_ok=True)
    px = bytes(((i * 7) % 256, (i // 256) % 256, (i * 13) % 256)) * 8
    raw = b"".join(b"\x00" + px for _ in range(8))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    with open(os.path.join(sub, f"{i:06d}.png"), "wb") as f:
        f.write(png)
open(os.path.join(root, ".complete"), "w").close()
PYEOF
  fi
  cat > "$DIR/job-$tag.toml" <<TOML
[run]
rounds = 1
seed = 0
[corpus]
root = "$corpus"
$targets
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
    out="$DIR/out-$tag-w$w"
    rm -rf "$out"
    start=$(date +%s.%N)
    "$BIN" run --config "$DIR/job-$tag.toml" --output "$out" -w "$w" --progress none \
      > "$DIR/run-$tag-w$w.log" 2> "$DIR/run-$tag-w$w.err"
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    test -f "$out/manifest.json"
    during[$w]=$(grep -o "peak RSS [0-9]* MiB after the dataflow" "$DIR/run-$tag-w$w.err" | awk '{print $3}')
    final=$(grep -o "[0-9]* MiB after finalize" "$DIR/run-$tag-w$w.err" | awk '{print $1}')
  done
  index_mib=$(echo "$size * 32 * 4 / 1048576" | bc -l)
  printf "| %d | %d | %.1f | %d | %d | %d | %d | %.1f |\n" "$n" "$size" "$index_mib" "${during[1]}" "${during[2]}" \
    $((during[2] - during[1])) "$final" "$wall"
done
