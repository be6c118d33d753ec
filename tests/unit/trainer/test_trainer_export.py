"""Exports on the tiny model: the diffusers folder, the single file and the LoRA weights all load with diffusers and
generate; the single file holds exactly the diffusers weights; the LoRA changes the base model's output and
reproduces the merged model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from dreambooth_api.config import BaseModelSpec, JobConfig
from dreambooth_trainer.components import load_components
from dreambooth_trainer.export import export_model, model_card, scheduler_class_name
from dreambooth_trainer.module import DreamBoothModule
from dreambooth_trainer.storage import ObjectStore

# The tiny model is cached by config hash, so test files share one build.
SHARED_MODELS = Path(tempfile.gettempdir()) / "dreambooth-test-models"
PROMPT = "a photo of sks dog"


def job(out: Path, method: str, formats: list[str], dtype: str = "fp32", **training: object) -> JobConfig:
    training = {"method": method, "resolution": 32, "trainTextEncoder": True, **training}
    if method == "lora":
        training.setdefault("lora", {"rank": 4, "alpha": 8})  # alpha != rank: the export must keep the scale
    return JobConfig.model_validate(
        {
            "name": "export-test",
            "instanceImages": {"uri": "file:///unused", "prompt": PROMPT},
            "training": training,
            "output": {"uri": out.as_uri(), "formats": formats, "dtype": dtype},
        }
    )


def trained(config: JobConfig) -> DreamBoothModule:
    """A module whose trained weights differ from the base (as after training), without spending time training."""
    comps = load_components(BaseModelSpec(tiny=True), ObjectStore(), SHARED_MODELS)
    # PEFT draws lora_A from torch's global generator: seed it, or how much the adapters change a sample varies
    # from run to run (one run in ~10 fell under the 0.05 bound below).
    torch.manual_seed(0)
    module = DreamBoothModule(comps, config.training)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in [*module.unet.named_parameters(), *module.text_encoder.named_parameters()]:
            if param.requires_grad and ("lora_B" in name or config.training.method == "full"):
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return module


def sample(pipe: StableDiffusionPipeline) -> np.ndarray:
    out = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    return np.asarray(out.images)


def test_lora_job_exports_all_three_formats(tmp_path: Path) -> None:
    config = job(tmp_path / "out", "lora", ["diffusers", "safetensors", "lora"])
    module = trained(config)
    result = export_model(module, config, ObjectStore(), tmp_path / "work", steps=7, final_loss=0.25)
    out = tmp_path / "out"
    assert result.model_uri == (out / "model").as_uri()
    assert (out / "model" / "model_index.json").is_file()
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "model.safetensors").is_file()
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "instance_prompt" in card
    assert "7 steps" in card

    folder = StableDiffusionPipeline.from_pretrained(out / "model")
    merged = sample(folder)
    assert merged.shape == (1, 32, 32, 3)
    single = StableDiffusionPipeline.from_single_file(str(out / "model.safetensors"), config=str(out / "model"))
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    np.testing.assert_allclose(sample(single), merged, atol=1e-5)

    base = StableDiffusionPipeline.from_pretrained(module.model_dir)
    # The folder keeps the base model's own scheduler (the tiny model's zero-terminal-SNR DDPM), not PNDM.
    assert type(folder.scheduler) is type(base.scheduler)
    assert dict(folder.scheduler.config) == dict(base.scheduler.config)
    assert folder.scheduler.config.rescale_betas_zero_snr
    before = sample(base)
    base.load_lora_weights(str(out / "lora"))
    with_lora = sample(base)
    assert np.abs(with_lora - before).max() > 0.05  # the adapters change the base model's output (0.067 seeded)
    np.testing.assert_allclose(with_lora, merged, atol=1e-3)  # and reproduce the merged export


def test_full_job_exports_fp16_diffusers_and_single_file(tmp_path: Path) -> None:
    config = job(tmp_path / "out", "full", ["diffusers", "safetensors"], dtype="fp16")
    module = trained(config)
    export_model(module, config, ObjectStore(), tmp_path / "work", steps=3)
    out = tmp_path / "out"
    assert not (out / "lora").exists()
    stored = load_file(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float16}
    folder = StableDiffusionPipeline.from_pretrained(out / "model", torch_dtype=torch.float32)
    images = sample(folder)
    assert np.isfinite(images).all()
    expected = module.unet.state_dict()
    got = folder.unet.state_dict()
    for key in ("conv_in.weight", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"):
        torch.testing.assert_close(got[key], expected[key].half().float())
    single = StableDiffusionPipeline.from_single_file(
        str(out / "model.safetensors"), config=str(out / "model"), torch_dtype=torch.float32
    )
    np.testing.assert_allclose(sample(single), images, atol=1e-5)


def test_lora_format_needs_lora_method(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lora"):
        job(tmp_path, "full", ["lora"])


def test_merge_after_bf16_training_keeps_a_small_lora_update(tmp_path: Path) -> None:
    """Mixed precision stores the frozen weights in bf16; the export merges into the base model's fp32 weights."""
    config = job(tmp_path / "out", "lora", ["diffusers"], dtype="fp16", trainTextEncoder=False)
    comps = load_components(BaseModelSpec(tiny=True), ObjectStore(), SHARED_MODELS)
    torch.manual_seed(0)
    module = DreamBoothModule(comps, config.training)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in module.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 1e-3)  # a small trained update
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    base_unet = {k.replace(".base_layer.", "."): v.clone() for k, v in module.unet.state_dict().items()}
    base_vae = {k: v.clone() for k, v in module.vae.state_dict().items()}
    delta = merged_weight(module, key) - base_unet[key]
    module.cast_frozen(torch.bfloat16)  # what training with mixedPrecision bf16 does on CUDA

    export_model(module, config, ObjectStore(), tmp_path / "work", steps=1)

    stored = load_file(tmp_path / "out" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    error = stored[key].float() - (base_unet[key] + delta)
    assert float(error.abs().mean()) < 0.1 * float(delta.abs().mean())  # bf16 base weights lost ~70%
    vae = load_file(tmp_path / "out" / "model" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(vae[k], v.half()) for k, v in base_vae.items())  # fp32 base cast once, to fp16


def merged_weight(module: DreamBoothModule, key: str) -> torch.Tensor:
    from dreambooth_trainer.export import merged_unet

    return merged_unet(module.unet).state_dict()[key].float()


@pytest.mark.parametrize(
    ("base", "zero_snr", "expected"),
    [
        ("PNDMScheduler", False, "PNDMScheduler"),
        ("PNDMScheduler", True, "DDIMScheduler"),  # PNDM cannot honour a zero-terminal-SNR schedule
        ("DDIMScheduler", True, "DDIMScheduler"),
        ("EulerDiscreteScheduler", True, "EulerDiscreteScheduler"),
        ("DDPMScheduler", True, "DDPMScheduler"),
        (None, False, "DDIMScheduler"),
        ("NoSuchScheduler", False, "DDIMScheduler"),
    ],
)
def test_exported_scheduler_is_the_base_models_own(base: str | None, zero_snr: bool, expected: str) -> None:
    assert scheduler_class_name(base, {"rescale_betas_zero_snr": zero_snr}) == expected


def test_model_card_of_a_lora_only_export_loads_the_base_and_lists_the_settings(tmp_path: Path) -> None:
    base_id = "example-org/base-model"  # only written into the card's text; nothing is loaded
    config = JobConfig.model_validate(
        {
            "name": "card",
            "baseModel": {"id": base_id},
            "instanceImages": {"uri": "file:///unused", "prompt": PROMPT},
            "training": {
                "method": "lora",
                "lora": {"rank": 16, "alpha": 32},
                "trainTextEncoder": True,
                "textEncoderSteps": 100,
                "textEncoderLearningRate": 5e-6,
                "mixedPrecision": "bf16",
                "optimizer": "adamw8bit",
                "snrGamma": 5.0,
                "offsetNoise": 0.05,
                "warmupSteps": 20,
            },
            "output": {"uri": (tmp_path / "out").as_uri(), "formats": ["lora"]},
        }
    )
    card = model_card(config, 400, 0.1, ["lora/pytorch_lora_weights.safetensors"])
    code = card.split("```python\n")[1].split("```")[0]
    assert code.splitlines() == [
        "from diffusers import StableDiffusionPipeline",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained("{base_id}")',
        'pipe.load_lora_weights("<download of lora/>")',
        f'image = pipe("{PROMPT}").images[0]',
    ]
    for text in (
        "LoRA rank 16, alpha 32.0",
        "Text encoder trained for the first 100 steps, learning rate 5e-06",
        "mixed precision bf16",
        "Optimizer adamw8bit",
        "gamma 5.0",
        "Offset noise 0.05",
        "20 warmup steps",
    ):
        assert text in card, text


class RecordingStore(ObjectStore):
    """file:// storage that records the order in which objects are written."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[str] = []

    def upload_file(self, local: Path | str, uri: str) -> None:
        super().upload_file(local, uri)
        self.written.append(uri)

    def write_bytes(self, uri: str, data: bytes) -> None:
        super().write_bytes(uri, data)
        self.written.append(uri)


def test_diffusers_folder_is_complete_once_model_index_is_there_and_has_a_manifest(tmp_path: Path) -> None:
    """`model_index.json` (what diffusers and the server take as a model folder) is uploaded after every other
    file of the folder, then the manifest of the folder's files and sizes, with the training resolution."""
    import json

    from dreambooth_trainer.export.manifest import MANIFEST_NAME, check_model_folder

    config = job(tmp_path / "out", "full", ["diffusers"], resolution=64)
    store = RecordingStore()
    export_model(trained(config), config, store, tmp_path / "work", steps=1)
    model = (tmp_path / "out" / "model").as_uri()
    folder = [uri for uri in store.written if uri.startswith(model + "/")]
    names = [uri.removeprefix(model + "/") for uri in folder]
    assert names[-2:] == ["model_index.json", MANIFEST_NAME], names
    assert "unet/diffusion_pytorch_model.safetensors" in names[:-2]
    manifest = json.loads((tmp_path / "out" / "model" / MANIFEST_NAME).read_text())
    on_disk = {
        p.relative_to(tmp_path / "out" / "model").as_posix(): p.stat().st_size
        for p in (tmp_path / "out" / "model").rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }
    assert manifest["files"] == on_disk
    assert manifest["resolution"] == 64
    assert check_model_folder(store, model).resolution == 64
