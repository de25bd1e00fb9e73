#!/usr/bin/env bash
# The README's analysis gallery: one picture from each analysis command.
# The trained models are the digits nano-zoo arena's runs: run `mixlab arena nano-zoo` first
# (about 25 minutes on 2 CPU cores), or point ZOO at its report directory.
set -euo pipefail
ZOO=${ZOO:-arena/digits-5ep-1seed}
OUT=${OUT:-docs/gallery}
# how far a model sees: random-initialised stacks of 31x31 and 3x3 depthwise convolutions, a ViT
mixlab erf "spec:patch4 / dwconv:4x32:kernel=31" "spec:patch4 / dwconv:4x32:kernel=3" nano_vit \
    --img-size 64 --out "$OUT/erf"
# what a trained CoAtNet's relative attention reads for the centre of a digit
mixlab affinity --checkpoint "$ZOO/runs/nano_coatnet/seed0" --index 5 --layer 0 --layer -1 --out "$OUT/affinity"
# how four trained families break under occlusion, shuffling, noise and other sizes
mixlab robustness --checkpoint "$ZOO/runs/nano_dwnet/seed0" --checkpoint "$ZOO/runs/nano_vit_c/seed0" \
    --checkpoint "$ZOO/runs/nano_pvt/seed0" --checkpoint "$ZOO/runs/nano_lrnet/seed0" --out "$OUT/robustness"
# what global attention, windows and convolutions cost as the image grows
mixlab scale vit_tiny_patch16_224 swin_tiny_patch4_window7_224 convnext_tiny --resolutions 128,256,512,1024 \
    --repeats 3 --out "$OUT/scale"
