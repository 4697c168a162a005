#!/usr/bin/env bash
# The long fuzz run: restarts the target after each crash/hang (kept under OUT/crashes/) until
# SECONDS of wall time have passed. One process at a time; run it under `nice -n 19`.
# Usage: nice -n 19 fuzz/run_long.sh OUT_DIR SECONDS        (from the repository root)
set -u
out=$(realpath -m "$1"); budget=$2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out/corpus" "$out/seeds" "$out/crashes" "$out/tmp"
export TMPDIR="$out/tmp"
python "$here/make_seeds.py" "$out/seeds" >> "$out/log.txt" 2>&1
end=$(( $(date +%s) + budget ))
i=0
while [ "$(date +%s)" -lt "$end" ]; do
  left=$(( end - $(date +%s) ))
  i=$((i + 1))
  echo "=== run $i started $(date -u +%FT%TZ), ${left}s left" >> "$out/log.txt"
  python "$here/fuzz_load_shrink.py" "$out/corpus" "$out/seeds" -timeout=60 -rss_limit_mb=4096 \
    -max_len=131072 -max_total_time="$left" -artifact_prefix="$out/crashes/" -print_final_stats=1 \
    >> "$out/log.txt" 2>&1
  rc=$?
  echo "=== run $i exited $rc at $(date -u +%FT%TZ)" >> "$out/log.txt"
  rm -rf "$out"/tmp/onnxshrink-fuzz-*
  [ "$rc" -eq 0 ] && break
done
