#!/bin/sh
# The world's LoRAs with known truth (world/README.md), in two lanes; each line is one train_lora.py run.
# Run from world/ with PYTHON set (the Makefile's world-loras target sets it, at nice 19 with one thread).
set -e
PY=${PYTHON:-python}
STEPS=${WORLD_LORA_STEPS:-600}
lane1() {
  $PY train_lora.py --name twemoji-style --designer twemoji --steps $STEPS
  $PY train_lora.py --name openmoji-black-style --designer openmoji-black --steps $STEPS
  $PY train_lora.py --name twemoji-style-seed31 --designer twemoji --steps $STEPS --seed 31
}
lane2() {
  $PY train_lora.py --name openmoji-color-style --designer openmoji-color --steps $STEPS
  $PY train_lora.py --name openmoji-black-trigger --designer openmoji-black --trigger zqx --steps $STEPS
  $PY train_lora.py --name openmoji-color-memorise --designer openmoji-color --works 5 --steps $STEPS
}
lane1 > ${LOG:-build}/lora_lane1.log 2>&1 & a=$!
lane2 > ${LOG:-build}/lora_lane2.log 2>&1 & b=$!
wait $a; wait $b
$PY train_lora.py --name twemoji-style-continued --designer twemoji --steps $((STEPS / 3)) --init loras/twemoji-style
$PY derive_lora.py
