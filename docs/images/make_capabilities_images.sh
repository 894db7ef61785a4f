#!/usr/bin/env bash
# The README's pictures of the paper's other capabilities (docs/capabilities.md), on a CPU, offline:
# photos shipped with scikit-image, teachers with RANDOM weights (--pretrained none), small students.
#   bash docs/images/make_capabilities_images.sh [WORK_DIR]      (about 10 minutes on two cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-$(mktemp -d)}
mkdir -p "$W/photos"
python - "$W/photos" <<'PY'
import sys, numpy as np, skimage.data
from PIL import Image
for n in ["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry"]:
    a = getattr(skimage.data, n)()
    a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
    Image.fromarray(a).save(f"{sys.argv[1]}/{n}.png")
PY
# distillation: 16 x 16 grid of 8-pixel patches, widths 512,512,256, 300 epochs of the 6 photos
apm-fast distill "$W/photos" --teacher vit_small_patch14_dinov2 --pretrained none --grid 16 --patch 8 \
    --hidden 512,512,256 --epochs 300 --batch 6 --lr 1e-3 --save-every 1000 --cache-features --no-progress --out "$W/run"
apm-fast decode "$W/photos/astronaut.png" --checkpoint "$W/run/model.safetensors" --crop center --out "$W/decode"
apm-fast interpolate "$W/photos/astronaut.png" "$W/photos/coffee.png" --checkpoint "$W/run/model.safetensors" \
    --crop center --frames 6 --size 96 --out "$W/interpolate"
# islands: the CPU demo's student (grid 16, widths 2048,1024,512) against a random CLIP ViT-B/16
apm-fast islands "$W/photos/astronaut.png" --teacher ViT-B-16 --pretrained none --grid 16 --hidden 2048,1024,512 \
    --steps 250 --every 50 --height 128 --out "$W/islands"
cp "$W/run/loss.png" docs/images/distill_loss.png
cp "$W/decode/decode.png" docs/images/decode.png
cp "$W/interpolate/interpolation.png" docs/images/interpolation.png
cp "$W/islands/islands.png" docs/images/islands.png
ls -la docs/images
