#!/usr/bin/env bash
# The README's main command (`make demo`): demo data -> train -> export -> serve -> curl.
# Expects the project's virtualenv first on PATH (the Makefile does that).
set -euo pipefail
PORT="${PORT:-3000}"
MODEL="${MODEL:-vit-classifier}"
DATA="${DATA:-data/demo}"
RUNS="${RUNS:-runs/demo}"  # each training run gets its own $RUNS/version_N

# Each step says when it started (seconds since the demo began), so a slow machine shows where.
step() { printf '\n==> [%4d s] %s\n' "$SECONDS" "$*"; }

# The port must be free before minutes of training: a server left on it (a `make serve`) would
# answer /readyz and the demo would post to that one while its own `bentoml serve` failed to bind.
# SO_REUSEADDR as the server sets it, so only a socket bound or listening there counts.
if ! python -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1])))' "$PORT" 2>/dev/null; then
  echo "port $PORT is in use (a \`make serve\` still running?): stop that server, or pick another port: make demo PORT=3001" >&2
  exit 1
fi

if [ ! -d "$DATA/train" ]; then
  step "Generating the demo dataset in $DATA (one line per class)"
  vit-data demo --out "$DATA"
fi

# A progress line per epoch: Lightning's bar on a terminal, ProgressLog's lines otherwise.
step "Training a tiny ViT (configs/demo.yaml, 30 epochs numbered 0-29; about 1.5 min on 2 idle cores)"
train_start=$SECONDS
vit-train fit --config configs/demo.yaml --trainer.default_root_dir "$RUNS" \
  --data.train_dir "$DATA/train" --data.val_dir "$DATA/val"
train_s=$((SECONDS - train_start))
run=$(ls -d "$RUNS"/version_* | sort -V | sed -n '$p')  # this run: the newest version_N

step "Exporting the best checkpoint of $run to the BentoML model store"
tag=$(vit-export --run "$run" --name "$MODEL")
echo "model: $tag"

step "Serving $tag on http://127.0.0.1:$PORT"
log=$(mktemp -t vit-serve.XXXX.log)
VIT_MODEL_TAG="$tag" bentoml serve vit_service.serving.service:ViTClassifier --host 127.0.0.1 --port "$PORT" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 $server 2>/dev/null; then echo "server exited:"; cat "$log"; exit 1; fi
  sleep 1
done
curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null || { echo "server not ready after 120 s:"; cat "$log"; exit 1; }

image=$(ls "$DATA"/val/*/* | sed -n 1p)
step "curl -F image=@$image http://127.0.0.1:$PORT/classify"
curl -sS -F "image=@$image" "http://127.0.0.1:$PORT/classify"
echo
echo "(true class: $(basename "$(dirname "$image")"); server log: $log; stopping the server)"
echo "demo took $((SECONDS / 60)) min $((SECONDS % 60)) s in all, training $((train_s / 60)) min $((train_s % 60)) s"
