#!/usr/bin/env bash
# The performance figures on one GPU (written for one H200; est. 6-8 min, each step capped so the whole stays < 10):
#   1. the CUDA-only tests: the Triton NLM kernel against PyTorch, the fused model in bf16 autocast (~1 min);
#   2. the gpu preset at d=768, 12 layers, seq 1024, batch 8, bf16 autocast: Llama + 4 CTMs (training tok/s,
#      efficiency, peak memory, cached decode) and the phase-3 rows (~4 min);
#   3. the same CTMs with ctm_nlm_implementation="fused" (Triton forward, recompute backward), no phase 3 (~2 min);
#   4. compiled rows (--compile: inductor training step, compiled static-cache decode step) for the Llama and the K=3
#      CTMs, with compile time and recompile counts (~4 min);
#   5. compiled decode only, replayed as CUDA graphs (--cuda-graphs), for the Llama and the last-layer K=3 CTM, one
#      sequence and 64 per step (~2 min; the whole then takes ~12-14 min: run steps 1-4 or 5 alone if time is short).
# Tables are printed and written to eval/results/perf-gpu{,-fused,-compiled,-cudagraphs-b1,-cudagraphs-b64}/results.md.
# Run from the repository root:
#   bash eval/gpu_check.sh
set -uo pipefail
out=${OUT:-eval/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv || true
timeout 90 python -m pytest -q tests/test_fused_nlm.py -rs
timeout 300 python eval/benchmark_performance.py --preset gpu --shapes d768-L12 --out "$out/perf-gpu"
timeout 150 python eval/benchmark_performance.py --preset gpu --shapes d768-L12 --phase3 off \
    --ctm-config '{"ctm_nlm_implementation": "fused"}' --out "$out/perf-gpu-fused"
timeout 270 python eval/benchmark_performance.py --preset gpu --shapes d768-L12 --phase3 off --compile --ticks 3 \
    --steps 5 --decode-contexts 128 1024 --out "$out/perf-gpu-compiled"
for batch in 1 64; do
    timeout 100 python eval/benchmark_performance.py --preset gpu --shapes d768-L12 --decode-only --compile \
        --cuda-graphs --placements last --ticks 3 --decode-batch "$batch" --decode-contexts 128 1024 \
        --out "$out/perf-gpu-cudagraphs-b$batch"
done
