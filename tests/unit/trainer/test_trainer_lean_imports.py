"""A run that does not train with adamw8bit never loads bitsandbytes, which diffusers, transformers and peft import
at start-up whenever it is installed (about 2 s of every job's start on this VM)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dreambooth_api.config import JobConfig
from dreambooth_trainer.lean_imports import EIGHT_BIT, unused_packages

# The trainer's model stack, imported as a training run does; prints whether bitsandbytes got loaded.
STACK = (
    "import sys\n"
    "from dreambooth_trainer.lean_imports import keep_out\n"
    "{keep}\n"
    "from diffusers import AutoencoderKL, UNet2DConditionModel\n"
    "from diffusers.utils import is_bitsandbytes_available\n"
    "from peft import LoraConfig\n"
    "import transformers\n"
    "print('bitsandbytes' in sys.modules and sys.modules['bitsandbytes'] is not None, is_bitsandbytes_available())\n"
)


def _config(**training: object) -> JobConfig:
    return JobConfig.model_validate(
        {"instanceImages": {"uri": "file:///tmp/x/", "prompt": "a sks dog"}, "output": {"uri": "file:///tmp/o/"},
         "training": training}
    )  # fmt: skip


def test_only_an_8bit_run_keeps_bitsandbytes() -> None:
    assert unused_packages(_config()) == [EIGHT_BIT]
    assert unused_packages(_config(optimizer="adamw8bit")) == []
    assert unused_packages(None) == [EIGHT_BIT]  # the sampling server


@pytest.mark.parametrize(("keep", "loaded"), [("", "True True"), ("keep_out(['bitsandbytes'])", "False False")])
def test_kept_out_bitsandbytes_is_neither_imported_nor_seen_by_diffusers(keep: str, loaded: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", STACK.format(keep=keep)], capture_output=True, text=True, timeout=180, check=True
    )
    assert done.stdout.split("\n")[-2] == loaded, done.stdout + done.stderr
