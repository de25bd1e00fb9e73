#!/usr/bin/env bash
# The README's masked-image-modeling experiment, every arm an arena (each resumes when rerun):
#   1. pretraining without labels on the 60,000 Fashion-MNIST training images at 32 px (SimMIM needs the
#      models' last stride, 8, to divide the image; 28 px does not), 5 epochs, seed 0: SimMIM for nano_vit,
#      nano_swin and nano_convnext, MAE for nano_vit (a 128-wide decoder of 2 blocks); the papers' recipes
#      (simmim, mae) with the learning rate set for these small batches (1e-3, one warm-up epoch);
#   2. labelled training on 5,000 of those images (the arena recipe, 10 epochs, 3 seeds), each model from
#      scratch, fine-tuned from each of its pretraining runs, and linearly probed from them;
# then the tables (benchmarks/compare_arenas.py: mean ± std over seeds, Welch's p against scratch).
# About three and a half hours on an idle 2-core CPU (--jobs 2: two runs side by side, one thread each); every arm
# checkpoints every 200 steps, so that an interrupted one loses little.
# Usage: bash benchmarks/mim/experiment.sh [OUT_DIR (default arena/mim)]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-arena/mim}
models=(nano_vit nano_swin nano_convnext)
pre=(--data fashion-mnist --img-size 32 --epochs 5 --seeds 1 --jobs 2 --batch-size 128 --set task=mim
     --set optimizer.lr=1e-3 --set schedule.warmup_epochs=1 --set data.limit_val=2000 --set checkpoint.every_steps=200)
mixlab arena "${models[@]}" "${pre[@]}" --recipe simmim --set mim.method=simmim --out "$out/pretrain-simmim"
mixlab arena nano_vit "${pre[@]}" --recipe mae --set mim.method=mae --set mim.decoder_dim=128 \
  --set mim.decoder_depth=2 --set mim.decoder_heads=4 --out "$out/pretrain-mae"
ft=(--data fashion-mnist --img-size 32 --epochs 10 --seeds 3 --jobs 2 --set data.limit_train=5000
    --set train.eval_every=5 --set checkpoint.every_steps=200)
mixlab arena "${models[@]}" "${ft[@]}" --out "$out/scratch"
for m in "${models[@]}"; do
  src=$out/pretrain-simmim/runs/$m/seed0
  mixlab arena "$m" "${ft[@]}" --set model.pretrained="$src" --out "$out/simmim-finetune-$m"
  mixlab arena "$m" "${ft[@]}" --set model.pretrained="$src" --set model.freeze=backbone --out "$out/simmim-probe-$m"
done
src=$out/pretrain-mae/runs/nano_vit/seed0
mixlab arena nano_vit "${ft[@]}" --set model.pretrained="$src" --out "$out/mae-finetune-nano_vit"
mixlab arena nano_vit "${ft[@]}" --set model.pretrained="$src" --set model.freeze=backbone --out "$out/mae-probe-nano_vit"
compare="python $here/../compare_arenas.py"
for m in "${models[@]}"; do
  arms=(scratch="$out/scratch" simmim="$out/simmim-finetune-$m" simmim-probe="$out/simmim-probe-$m")
  [ "$m" = nano_vit ] && arms+=(mae="$out/mae-finetune-nano_vit" mae-probe="$out/mae-probe-nano_vit")
  $compare "${arms[@]}" --model "$m"
done
