#!/usr/bin/env bash
# The one script for the lent GPU machine: install the carried wheels, print the machine and versions, run the gpu
# test tier, then the GPU benchmarks; logs, the JUnit report and the JSON results go to $OUT (at most 8 flat files).
#
#   bash bench/device_check.sh          (from the repository root; OUT must name an empty, writable folder)
#
# Carry `.whl`, filled by `bash bench/device_wheels.sh` (cp312 wheels of what the device's Python lacks: diffusers,
# transformers, huggingface-hub, pydantic(+core), annotated-types, typing-inspection, prometheus-client,
# tensorboard with absl-py and protobuf, and bitsandbytes slimmed to its CUDA 13 libraries; about 31 MiB).
# boto3/botocore are not needed: storage imports boto3 lazily and the tests and benchmarks use file:// storage.
# Checked on the CPU with Python 3.12 + torch 2.11 (cu130) and these wheels: only CUDA-only assertions fail. Every step has its own `timeout`; the whole script stays under ~8 minutes
# (~12 with the serving benchmark, which DEVICE_CHECK_SERVE_SECONDS=0 skips).
# Tunable: DEVICE_CHECK_{INSTALL,TESTS,BENCH,SERVE}_SECONDS.
set -uo pipefail

: "${OUT:?set OUT to the folder that receives the results}"
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
LOG="$OUT/device_check.log"
exec > >(tee -a "$LOG") 2>&1

INSTALL_SECONDS=${DEVICE_CHECK_INSTALL_SECONDS:-120}
TESTS_SECONDS=${DEVICE_CHECK_TESTS_SECONDS:-240}
BENCH_SECONDS=${DEVICE_CHECK_BENCH_SECONDS:-180}
SERVE_SECONDS=${DEVICE_CHECK_SERVE_SECONDS:-300}
SITE=/tmp/site
status=0

step() { printf '\n==== %s (%s) ====\n' "$1" "$(date -u +%H:%M:%S)"; }

step "install carried wheels into $SITE"
# One wheel per distribution (the newest version when .whl holds several): pip refuses or picks arbitrarily otherwise.
mapfile -t WHEELS < <(python3 - "$ROOT/.whl" <<'PY'
import re, sys
from pathlib import Path

def key(path):
    name, version = path.name.split("-")[:2]
    return name.lower().replace("_", "-"), [int(x) if x.isdigit() else 0 for x in re.split(r"[.+]", version)]

best = {}
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, version = key(wheel)
    if name not in best or version > key(best[name])[1]:
        best[name] = wheel
print("\n".join(str(w) for w in best.values()))
PY
)
printf '%s\n' "${WHEELS[@]}"
if ((${#WHEELS[@]})); then
  timeout "$INSTALL_SECONDS" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${WHEELS[@]}" || { echo "wheel install failed"; status=1; }
else
  echo "no wheels under .whl/"; status=1
fi
export PYTHONPATH="$SITE:$ROOT/api/src:$ROOT/trainer/src:$ROOT/operator/src"
export PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

step "machine"
nvidia-smi -L || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 - <<'PY' | tee "$OUT/env.json"
import importlib, json, platform, shutil, sysconfig
from pathlib import Path

info = {"python": platform.python_version(), "cc": shutil.which("cc") or shutil.which("gcc"),
        "pythonHeaders": (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()}
for name in ("torch", "triton", "pytorch_lightning", "lightning_fabric", "diffusers", "transformers", "peft",
             "accelerate", "huggingface_hub", "tokenizers", "safetensors", "pydantic", "pydantic_core", "yaml",
             "regex", "requests", "PIL", "numpy", "bitsandbytes", "boto3", "pytest", "dreambooth_trainer"):
    try:
        module = importlib.import_module(name)
        info[name] = getattr(module, "__version__", "present") + f" ({Path(module.__file__ or '?').parent})"
    except Exception as err:  # report, do not stop: the tests say what each missing piece breaks
        info[name] = f"MISSING: {type(err).__name__}: {err}"[:300]
try:
    import torch
    info["cuda"] = torch.version.cuda
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info["bf16"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
except Exception as err:
    info["cudaError"] = repr(err)
print(json.dumps(info, indent=2))
PY

step "gpu tests"
# A private ini instead of the root pyproject: its --strict-config names pytest-timeout's `timeout` option, which
# this machine's pytest lacks, and its warnings-as-errors list is tuned to the locked versions, not these.
# --confcutdir keeps tests/conftest.py (and the test-binary fixtures it loads) out: tests/gpu/conftest.py is enough.
INI=$(mktemp /tmp/pytest-gpu-XXXX.ini)
cat >"$INI" <<'INI'
[pytest]
markers =
    unit: pure logic, no services
    integration: real control plane and S3
    e2e: the test node agent runs real pods
    gpu: needs CUDA; skipped without it
INI
timeout --kill-after=15 "$TESTS_SECONDS" python3 -m pytest tests/gpu -q -p no:cacheprovider -c "$INI" \
  --rootdir "$ROOT" --confcutdir "$ROOT/tests/gpu" -ra --durations=15 --junitxml "$OUT/gpu_tests.xml"
rc=$?
echo "gpu tests exit code: $rc"
((rc == 0)) || status=1

step "gpu benchmarks"
MARK=$(mktemp /tmp/bench-start-XXXX)  # results that travelled with the tree are older: never report those
timeout --kill-after=15 "$BENCH_SECONDS" python3 -m bench bench_gpu_train bench_checkpoint
rc=$?
echo "benchmarks exit code: $rc"
((rc == 0)) || status=1
for f in gpu_train.json checkpoint.json summary.json; do
  if [[ bench/results/$f -nt $MARK ]]; then cp "bench/results/$f" "$OUT/$f"; else echo "no fresh bench/results/$f"; fi
done

step "gpu serving benchmark"
# bench/bench_serve.py --gpu: an SD 1.5-sized model (random weights), 512 px, 25 steps, fp16, batched against the
# server's unbatched mode at concurrency 1/4/16, LoRA cold load and warm switch; serve_gpu.json has the targets.
# `make test` runs this code path on the CPU first (`--gpu --dry-run`, tests/unit/bench/test_bench_serve.py).
if ((SERVE_SECONDS > 0)); then
  timeout --kill-after=15 "$SERVE_SECONDS" python3 -m bench.bench_serve --gpu
  rc=$?
  echo "serving benchmark exit code: $rc"
  ((rc == 0)) || status=1
  if [[ bench/results/serve_gpu.json -nt $MARK ]]; then cp bench/results/serve_gpu.json "$OUT/serve_gpu.json"; else echo "no fresh bench/results/serve_gpu.json"; fi
else
  echo "skipped (DEVICE_CHECK_SERVE_SECONDS=0)"
fi

step "done (status $status)"
ls -la "$OUT"
exit "$status"
