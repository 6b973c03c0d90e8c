#!/usr/bin/env bash
# `bench/serve.py` against `hf-paged serve` (engine thread, engine process) and `transformers serve
# --continuous-batching`, same model, same
# prompts, same machine; each server warmed up with a short pass first (Triton compiles, model load on first use).
#
#   bash bench/serve_compare.sh MODEL_DIR OUT_DIR [more bench/serve.py arguments]
#
# Writes OUT_DIR/serve-<server>.json (hf-paged with the engine in a thread, then in its own process, then
# with N front-end processes for each N in API_SERVERS (e.g. API_SERVERS="2 4"), then transformers) and each
# server's log.
set -uo pipefail
model=$1; out=$2; shift 2
extra=("$@")
mkdir -p "$out"
port=18765
name=$(basename "$model")

bench() {  # label, server command...
  local label=$1; shift
  "$@" > "$out/$label-server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/v1/models" > /dev/null && break
    kill -0 $pid 2> /dev/null || { echo "$label server exited:"; tail -20 "$out/$label-server.log"; return 1; }
    sleep 1
  done
  local common=(--base-url "http://127.0.0.1:$port" --model "$model_name" --server-label "$label" --max-tokens 128)
  python bench/serve.py "${common[@]}" --num-prompts 64 --max-concurrency 64 --seed 1 --out "$out/warmup-$label.json" > /dev/null
  python bench/serve.py "${common[@]}" --num-prompts 1000 --max-concurrency 256 --out "$out/serve-$label.json" \
    --server-pid $pid "${extra[@]}" \
    | tail -18
  kill -TERM $pid; wait $pid
}

servers=" ${SERVERS:-hf-paged hf-paged-engine-process transformers} "  # SERVERS="transformers" runs only that one
want() { [[ $servers == *" $1 "* ]]; }
model_name=$name
want hf-paged && bench hf-paged python -m hf_paged serve "$model" --port $port --served-model-name "$name" --log-level warning
want hf-paged-engine-process && bench hf-paged-engine-process python -m hf_paged serve "$model" --port $port --served-model-name "$name" \
  --log-level warning --engine-process
for n in ${API_SERVERS:-}; do
  bench "hf-paged-api-servers-$n" python -m hf_paged serve "$model" --port $port --served-model-name "$name" \
    --log-level "${LOG_LEVEL:-warning}" --api-server-count "$n"
done
model_name=$model
mkdir -p "${HF_HUB_CACHE:-$HOME/.cache/huggingface/hub}"  # transformers serve lists that cache on /v1/models
want transformers && bench transformers transformers serve --continuous-batching --port $port
