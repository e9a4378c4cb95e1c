#!/bin/sh
# The world's LoRAs with known truth (world/README.md), in two lanes; each line is one train_lora.py run.
# Run from world/ with PYTHON set (the Makefile's world-loras target sets it, at nice 19 with one thread).
# --resume continues a run stopped at its last checkpoint (world/build/checkpoints/lora_<name>.pt).
set -e
PY=${PYTHON:-python}
STEPS=${WORLD_LORA_STEPS:-300}
lane1() {
  $PY train_lora.py --resume --name twemoji-style --designer twemoji --steps $STEPS
  $PY train_lora.py --resume --name openmoji-black-style --designer openmoji-black --steps $STEPS
  $PY train_lora.py --resume --name openmoji-color-memorise --designer openmoji-color --works 5 --steps $STEPS
}
lane2() {
  $PY train_lora.py --resume --name openmoji-color-style --designer openmoji-color --steps $STEPS
  $PY train_lora.py --resume --name openmoji-black-trigger --designer openmoji-black --trigger zqx --steps $STEPS
  $PY train_lora.py --resume --name twemoji-style-seed31 --designer twemoji --steps $STEPS --seed 31
}
mkdir -p build
lane1 > build/lora_lane1.log 2>&1 & a=$!
lane2 > build/lora_lane2.log 2>&1 & b=$!
wait $a; wait $b
$PY train_lora.py --resume --name twemoji-style-continued --designer twemoji --steps $((STEPS / 3)) --init loras/twemoji-style
$PY derive_lora.py --source twemoji-style
