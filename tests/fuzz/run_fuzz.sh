#!/bin/sh
# run_fuzz.sh FUZZER MODELS_DIR GEN_MODEL: runs FUZZER for $FUZZ_TIME seconds (default 60) over
# a seed corpus in a temporary folder: every GGUF under MODELS_DIR up to 2 MB and a synthetic
# model from GEN_MODEL. Crashes are written to the temporary folder and the fuzzer's output says
# where; the folder is removed on success and kept on failure.
set -eu
fuzzer=$1
models=$2
gen=$3
time=${FUZZ_TIME:-60}

dir=$(mktemp -d "${TMPDIR:-/tmp}/kvd-fuzz-XXXXXX")
mkdir "$dir/corpus"
if [ -d "$models" ]; then
  find "$models" -name '*.gguf' -size -2048k -exec cp {} "$dir/corpus/" \;
fi
"$gen" --dim 32 --layers 1 --heads 4 --kv-heads 2 --ffn 64 --vocab 300 --ctx 64 --type q8_0 \
  --out "$dir/corpus/synth-q8_0.gguf"
"$gen" --dim 16 --layers 1 --heads 2 --kv-heads 1 --ffn 24 --vocab 259 --ctx 16 --type f16 --tied \
  --out "$dir/corpus/synth-f16.gguf"
echo "fuzz: $(ls "$dir/corpus" | wc -l) seeds in $dir/corpus, $time s"

cd "$dir"
if "$fuzzer" -max_total_time="$time" -timeout=10 -rss_limit_mb=4096 -max_len=2200000 \
  -print_final_stats=1 "$dir/corpus"; then
  rm -rf "$dir"
else
  rc=$?
  echo "fuzz: failed ($rc); crash inputs kept in $dir" >&2
  exit "$rc"
fi
