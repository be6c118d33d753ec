"""DreamBooth fine-tuning of Stable Diffusion: config, data, training runtime, export and serving."""

import logging as _logging

# peft imports bitsandbytes when it is installed (the trainer image has it for adamw8bit). On CPUs with AVX-512 BF16
# its CPU backend then warns, at import, that an optional hub-downloaded 4-bit kernel ("pip install kernels") is
# missing. We never use 4-bit CPU matmuls, and that line in every trainer and server log reads like an error.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
