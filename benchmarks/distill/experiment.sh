#!/usr/bin/env bash
# The README's distillation and transfer experiment, every arm an arena (each resumes when rerun):
#   1. Fashion-MNIST (5,000 training images, the 10,000 test images, 28 px, the arena recipe, 10 epochs,
#      3 seeds): nano_resnet (the teacher, and a transfer source) and nano_vit with a distillation
#      token trained from scratch; then the same student distilled from nano_resnet seed 0, hard and soft;
#   2. digits (the arena's 5 epochs, 3 seeds): each model from scratch, fine-tuned from its Fashion-MNIST
#      run (seed 0) and linearly probed from it;
# then the tables (benchmarks/compare_arenas.py). About an hour and a half on 2 CPU cores (--jobs 2: two runs
# side by side, one thread each), by the wall times of the README's runs.
# Usage: bash benchmarks/distill/experiment.sh [OUT_DIR (default arena/distill)]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-arena/distill}
vit=$here/nano_vit_distilled.yaml
fm=(--data fashion-mnist --epochs 10 --seeds 3 --jobs 2 --set data.limit_train=5000 --set train.eval_every=5)
mixlab arena nano_resnet "$vit" "${fm[@]}" --out "$out/scratch"
teacher=$out/scratch/runs/nano_resnet/seed0
for type in hard soft; do
  mixlab arena "$vit" "${fm[@]}" --set task=distill --set distill.teacher="$teacher" --set distill.type=$type \
    --out "$out/$type"
done
dg=(--data digits --seeds 3 --jobs 2)
mixlab arena nano_resnet "$vit" "${dg[@]}" --out "$out/digits-scratch"
for m in nano_resnet nano_vit_distilled; do
  model=$m; [ "$m" = nano_vit_distilled ] && model=$vit
  mixlab arena "$model" "${dg[@]}" --set model.pretrained="$out/scratch/runs/$m/seed0" --out "$out/digits-finetune-$m"
  mixlab arena "$model" "${dg[@]}" --set model.pretrained="$out/scratch/runs/$m/seed0" --set model.freeze=backbone \
    --out "$out/digits-probe-$m"
done
compare="python $here/../compare_arenas.py"
$compare scratch="$out/scratch" hard="$out/hard" soft="$out/soft" --model nano_vit_distilled
for m in nano_resnet nano_vit_distilled; do
  $compare scratch="$out/digits-scratch" finetune="$out/digits-finetune-$m" probe="$out/digits-probe-$m" --model $m
done
