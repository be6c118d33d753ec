"""Importing the trainer's model stack prints nothing: bitsandbytes' CPU backend (imported through peft) warns about
an optional 4-bit kernel on CPUs with AVX-512 BF16, which reads like an error in every trainer and server log."""

from __future__ import annotations

import subprocess
import sys


def test_bitsandbytes_cpu_kernel_warning_is_not_printed() -> None:
    code = (
        "import dreambooth_trainer, logging\n"
        "from diffusers import UNet2DConditionModel\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU gemm_4bit_forward')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "gemm_4bit_forward" not in done.stderr + done.stdout
