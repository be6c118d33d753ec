"""Evaluation after training, and the vision-language model (VLM) that captions and judges.

- `metrics`: DINO, CLIP-I and CLIP-T (pure tensor math, and the transformers models that embed images and text);
- `fetch`, `tiny`: where the metric models come from (hub id, object-storage folder, or tiny ones built from configs);
- `judge`: DreamBench++-style scores (concept preservation, prompt following) and the quality gate;
- `outputs`: the sample files, the image grid and the result documents;
- `runner`: `run_evaluation`, the one entry point;
- `stage`: the job runner's calls (captions before training, the prompts trained on, the evaluation after export).

The VLM client, the answer parser and the caption rules are `dreambooth_api.vlm` (torch-free: the CLI's
`submit --caption` uses them too). `judge` imports neither torch nor diffusers.
"""
