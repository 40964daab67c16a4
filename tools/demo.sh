#!/bin/sh
# The main job, end to end: install what is missing, build, start kvd on a model and answer a
# prompt with kvctl. The model is the real tiny stories260K from ../shared/models when present,
# else a generated one (random weights: the text is gibberish, but every step is real).
# Usage: tools/demo.sh ["prompt"]    (KVD_NO_SETUP=1 skips the package step)
set -eu
cd "$(dirname "$0")/.."
PROMPT=${1:-Once upon a time}

if [ "${KVD_NO_SETUP:-0}" != 1 ]; then tools/setup.sh; fi
[ -d build ] || meson setup build >/dev/null
ninja -C build >/dev/null

model=../shared/models/stories260K.gguf
work=$(mktemp -d)
if [ ! -f "$model" ]; then
  model=$work/synthetic.gguf
  build/tools/gen_model --type q8_0 --seed 7 --out "$model"
fi
sock=$work/kvd.sock
build/daemon/kvd --model "$model" --socket "$sock" --config /dev/null 2>"$work/kvd.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
i=0
while [ ! -S "$sock" ]; do
  i=$((i + 1))
  if [ $i -gt 600 ] || ! kill -0 $pid 2>/dev/null; then cat "$work/kvd.log"; exit 1; fi
  sleep 0.1
done
echo "kvd is serving $(basename "$model") on $sock; asking: $PROMPT"
printf '%s' "$PROMPT"
build/client/kvctl --socket "$sock" --temperature 0 --max-tokens 60 "$PROMPT"
echo
