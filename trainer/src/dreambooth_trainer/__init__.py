"""DreamBooth fine-tuning of Stable Diffusion: config, data, training runtime, export and serving."""
