#!/usr/bin/env bash
# Rebuild goose's built-in demo model from scratch: a byte-level RWKV-7 trained on the King James Bible.
# Writes goose/assets/demo-kjv.pth (official layout, bf16), goose/assets/demo-kjv.json and
# docs/demo_model_loss.png. The training (600 steps of 8 x 512 bytes, 2.5M bytes: about half the text once)
# took 25 minutes on a busy 2-core CPU with OMP_NUM_THREADS=1; on a machine shared with other jobs one
# thread is several times faster than two (the threads wait for each other at every small parallel region).
#
# The text comes from Debian (public domain; see the copyright file of bible-kjv-text):
#     apt-get install bible-kjv bible-kjv-text
# Environment: VENV (default .venv), RUN (default runs/demo_kjv; must not hold a finished run).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
RUN=${RUN:-runs/demo_kjv}
DATA=runs/kjv

command -v bible >/dev/null || { echo "needs Debian's bible program: apt-get install bible-kjv bible-kjv-text" >&2; exit 1; }
mkdir -p "$DATA"
bible -f Gen1:1-Rev22:21 > "$DATA/kjv.txt"          # 31,102 verses, one a line: "Ge1:1 In the beginning ..."
"$VENV/bin/goose" data "$DATA/kjv.txt" --out "$DATA/kjv" --tokenizer byte

"$VENV/bin/goose" train --data "$DATA/kjv" --tokenizer byte --out "$RUN" \
    --model-size L4-D256 --ctx-len 512 --micro-batch 8 --steps 600 \
    --lr-init 1.5e-3 --lr-final 1e-4 --warmup-steps 20 --precision bf16 \
    --eval-every 50 --eval-batches 8 --save-every 100 --seed 0

"$VENV/bin/python" -m goose.demo package "$RUN"
"$VENV/bin/python" -m goose.experiments.plot docs/demo_model_loss.png "$RUN" \
    --title "built-in demo model: byte-level RWKV-7 L4-D256 on the King James Bible"
