#!/usr/bin/env bash
# Fill the git-ignored .whl/ with the cp312 wheels that bench/device_check.sh installs on the lent GPU machine,
# whose Python 3.12 already has torch (CUDA 13), Lightning, peft, accelerate, safetensors, numpy, Pillow and pytest.
# The device run carries at most 64 MiB, so bitsandbytes keeps only its CUDA 13 and CPU libraries (the full wheel
# is 43 MB), and boto3 stays home (the device tests use file:// storage).
#
#   bash bench/device_wheels.sh          (from the repository root; needs the pinned .venv for its pip)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
pip=(.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d "$dest")
lock() { grep -E "^$1==" requirements/dev.lock | head -1; }
# The trainer's own pins where the device lacks the package; tensorboard's runtime needs absl-py and protobuf.
"${pip[@]}" "$(lock diffusers)" "$(lock transformers)" "$(lock huggingface-hub)" "$(lock pydantic)" \
  "$(lock pydantic-core)" "$(lock annotated-types)" "$(lock typing-inspection)" "$(lock prometheus-client)" \
  "$(lock tensorboard)" "$(lock absl-py)" "$(lock protobuf)"
# The sampling server (bench_serve.py --gpu): FastAPI (it imports opentelemetry-api) on uvicorn.
"${pip[@]}" "$(lock fastapi)" "$(lock starlette)" "$(lock uvicorn)" "$(lock h11)" "$(lock anyio)" "$(lock sniffio)" \
  "$(lock idna)" "$(lock click)" "$(lock annotated-doc)" "$(lock typing-extensions)" "$(lock opentelemetry-api)" \
  "$(lock importlib-metadata)" "$(lock zipp)"
bnb=$(grep -oE 'bitsandbytes==[0-9.]+' trainer/pyproject.toml)
"${pip[@]}" "$bnb"
wheel=$(ls "$dest"/bitsandbytes-*.whl)
.venv/bin/python - "$wheel" <<'PY'
import re, sys, zipfile
from pathlib import Path

path = Path(sys.argv[1])
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
tmp = path.with_suffix(".slim")
with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
    for item in src.infolist():
        if item.filename.endswith(".so") and not keep.search(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(l for l in lines if not (".so," in l and not keep.search(l.split(",")[0]))) + "\n").encode()
        out.writestr(item, data)
tmp.replace(path)
PY
du -sh "$dest"; ls -la "$dest"
