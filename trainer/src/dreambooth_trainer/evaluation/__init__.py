"""Evaluation after training, and the vision-language model (VLM) that captions and judges.

- `metrics`: DINO, CLIP-I and CLIP-T (pure tensor math, and the transformers models that embed images and text);
- `fetch`, `tiny`: where the metric models come from (hub id, object-storage folder, or tiny ones built from configs);
- `answers`: finding and validating the JSON object in a VLM's answer (pure);
- `vlm`: the client of an OpenAI-compatible chat-completions endpoint (the official `openai` package);
- `captions`: instance-image captions written by the VLM, as .txt sidecars;
- `judge`: DreamBench++-style scores (concept preservation, prompt following) and the quality gate;
- `outputs`: the sample files, the image grid and the result documents;
- `runner`: `run_evaluation`, the one entry point.

`answers`, `vlm`, `captions` and `judge` import neither torch nor diffusers.
"""
