#!/bin/sh
# run_fuzz.sh FUZZER MODELS_DIR GEN_MODEL: runs FUZZER for $FUZZ_TIME seconds (default 30) over a
# seed corpus in a temporary folder: every GGUF under MODELS_DIR up to 2 MB and two small synthetic
# models from GEN_MODEL. The folder is removed on success and kept on failure, crash inputs in it.
set -eu
# meson passes build-relative paths; the fuzzer runs from the temporary folder
fuzzer=$(realpath "$1")
models=$2
gen=$(realpath "$3")
time=${FUZZ_TIME:-30}

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
# Inputs are cut to 256 KiB: small inputs run many times faster, and the stories260K files' whole
# metadata and tensor-info region still fits (what is cut is tensor data, which the reader checks
# by offset alone); the vocabulary files are cut inside their token arrays.
if "$fuzzer" -max_total_time="$time" -timeout=30 -rss_limit_mb=4096 -max_len=262144 \
  -print_final_stats=1 "$dir/corpus"; then
  rm -rf "$dir"
else
  rc=$?
  echo "fuzz: failed ($rc); crash inputs kept in $dir" >&2
  exit "$rc"
fi
