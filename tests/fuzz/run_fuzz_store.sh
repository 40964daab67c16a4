#!/bin/sh
# run_fuzz_store.sh FUZZER: runs the session-file fuzzer for $FUZZ_STORE_TIME seconds (default 20)
# from a seed the fuzzer writes itself into a temporary corpus folder, kept with the crash inputs
# on failure.
set -eu
fuzzer=$(realpath "$1")
time=${FUZZ_STORE_TIME:-20}
dir=$(mktemp -d "${TMPDIR:-/tmp}/kvd-fuzz-store-XXXXXX")
mkdir "$dir/corpus"
cd "$dir"
if TMPDIR="$dir" "$fuzzer" -max_total_time="$time" -timeout=30 -rss_limit_mb=2048 -max_len=65536 \
  -print_final_stats=1 "$dir/corpus"; then
  rm -rf "$dir"
else
  echo "fuzz_store: failure; inputs kept in $dir"
  exit 1
fi
