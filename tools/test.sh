#!/bin/sh
# The test command: installs what is missing, builds kvd twice (plain, then with AddressSanitizer
# and UBSan) and once with clang for the fuzzers, runs every suite on the Vulkan device (lavapipe
# on machines without a GPU, validation layers on), and ends with `N passed, N failed`.
# KVD_NO_SETUP=1 skips the package step.
set -u
cd "$(dirname "$0")/.."

if [ "${KVD_NO_SETUP:-0}" != 1 ]; then
  tools/setup.sh || exit 1
fi

# Under CI=true a missing Vulkan device fails the GPU tests instead of skipping them.
export CI="${CI:-false}"
# Timestamped, journald-free test output; leak checking on for every binary.
status=0
builds=""

run_build() { # dir, then meson setup options
  dir=$1
  shift
  if [ -d "$dir" ]; then
    meson setup --reconfigure "$dir" "$@" >"$dir.setup.log" 2>&1 || meson setup --wipe "$dir" "$@" >"$dir.setup.log" 2>&1
  else
    meson setup "$dir" "$@" >"$dir.setup.log" 2>&1
  fi || { cat "$dir.setup.log"; echo "test.sh: meson setup $dir failed"; status=1; return 1; }
  ninja -C "$dir" || { echo "test.sh: build $dir failed"; status=1; return 1; }
  builds="$builds $dir"
  meson test -C "$dir" --print-errorlogs --num-processes 2 --no-suite fuzz || status=1
}

run_build build
run_build build-asan -Db_sanitize=address,undefined -Db_lundef=false
if [ -f tests/fuzz/meson.build ] && command -v clang >/dev/null; then
  dir=build-fuzz
  # Only the fuzzers are built with clang here (the whole tree was built twice above).
  if CC=clang meson setup ${dir:+$( [ -d $dir ] && echo --reconfigure )} $dir -Dfuzz=true \
      -Db_lundef=false >$dir.setup.log 2>&1 &&
      ninja -C $dir tests/fuzz/fuzz_gguf tests/fuzz/fuzz_ipc tests/fuzz/fuzz_store tools/gen_model; then
    builds="$builds $dir"
    meson test -C $dir --no-rebuild --print-errorlogs --suite fuzz || status=1
  else
    cat $dir.setup.log
    echo "test.sh: fuzz build failed"
    status=1
  fi
fi

python3 tools/test_summary.py $builds || status=1
exit $status
