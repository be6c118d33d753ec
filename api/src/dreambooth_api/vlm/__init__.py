"""The vision-language-model (VLM) client and the caption rules, shared by the trainer and the CLI.

- `answers`: finding and validating the JSON object in a VLM's answer (pure);
- `client`: `VlmClient`, the client of an OpenAI-compatible chat-completions endpoint (the official `openai`
  package), and `probe_endpoint`, the pre-flight check that the endpoint answers and serves the model;
- `captions`: instance-image captions written by the VLM as .txt sidecars, with the subject text ("sks dog") in
  every caption: the trainer's `captions: auto` and `dreambooth submit --caption` both use it.

Torch-free; it needs `openai` and `pillow` (the package's `vlm` extra), which the trainer and the CLI install and
the operator image does not: the operator never imports this package (an import-linter contract).
"""
