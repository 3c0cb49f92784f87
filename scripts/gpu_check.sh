#!/usr/bin/env bash
# One-GPU check, ~10 minutes on a CUDA machine: train the gpu preset for a few hundred steps and
# print clips/s, MFU and the share of time the loop waited for data; then time the paper preset's
# batch-1 latency (mono and stereo; base vs Presto-S vs Presto-LS) on random weights, and the
# decode time of each ae.decoder (Griffin-Lim vs the learned inverse STFT).
#
#   bash scripts/gpu_check.sh                       # defaults: gpu preset, 300 steps, paper latency
#   PRESET=tiny STEPS=20 LATENCY_PRESET=tiny bash scripts/gpu_check.sh   # a smoke test on a CPU
#
# Writes into OUT (default runs/gpu_check); needs nothing trained beforehand (the gpu preset's
# autoencoder is trained for AE_STEPS steps first, so the DiT has a latent to diffuse).
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-gpu}; STEPS=${STEPS:-300}; AE_STEPS=${AE_STEPS:-100}
LATENCY_PRESET=${LATENCY_PRESET:-paper}; OUT=${OUT:-runs/gpu_check}
python -c "import torch; print('torch', torch.__version__, '| CUDA:', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
rm -rf "$OUT"
every="train.log_every=25 train.eval_every=0 train.ckpt_every=0"
latent=$(python -c "import config; print(config.make_config('$PRESET').ae.latent_channels)")
if [ "$latent" -gt 0 ]; then    # a latent preset: its autoencoder first
  python train.py --stage ae --preset "$PRESET" --out "$OUT" --set ae.steps="$AE_STEPS" $every 2>&1 | grep -v "it/s"
fi
python train.py --stage base --preset "$PRESET" --out "$OUT" --set train.steps="$STEPS" $every 2>&1 | grep -v "it/s"
python - "$OUT/base_log.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"clips_per_s"' in l][1:]   # the first includes warm-up
if not rows:
    sys.exit("no timed log rows: raise STEPS")
mean = lambda k: sum(r.get(k, 0.0) for r in rows) / len(rows)
mfu = f"MFU {mean('mfu'):.1%}" if "mfu" in rows[0] else "MFU unknown (set train.peak_tflops)"
print(f"base training, {len(rows)} log rows after warm-up: {mean('clips_per_s'):.1f} clips/s, "
      f"{mfu}, waiting for data {mean('data_wait'):.1%} of the time")
PY
python evaluate.py --latency-only --preset "$LATENCY_PRESET" --channels 1 2 --out "$OUT"
grep -E "^(## |\| )" "$OUT/latency.md"   # the tables (latency.json holds every number)
# the decoders alone: decode s per clip with each ae.decoder (the preset's own was timed above)
for decoder in griffin-lim istft; do
  python evaluate.py --latency-only --preset "$LATENCY_PRESET" --channels 1 --rows presto-s \
    --set ae.decoder=$decoder --out "$OUT/decoder_$decoder" > /dev/null
  echo "ae.decoder=$decoder: $(grep -E '^\| Presto-S' "$OUT/decoder_$decoder/latency.md" | cut -d'|' -f7) s decode"
done
