"""`dreambooth-serve`: a small HTTP sampling server for a trained model (and LoRA adapters).

Configuration (environment; the InferenceService's Deployment sets it, names in `dreambooth_api.env`):
- `env.SERVE_CONFIG`: a `dreambooth_api.serving.ServeConfig` as JSON, or a path to a JSON/YAML file.
- `env.SERVE_TOKEN`: when set, POST /generate needs `Authorization: Bearer <token>`.
- `env.BIND_ADDRESS` (default 0.0.0.0), `env.SERVE_PORT` (default 8080), `env.WORKDIR`.
- S3 credentials as for the trainer (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).

Endpoints:
- `POST /generate` with JSON `{"prompt", "negativePrompt"?, "steps"?, "seed"?, "width"?, "height"?, "guidanceScale"?,
  "numImages"?, "scheduler"?, "adapters"? {name: weight}, "format"? "png"|"json"}` -> `image/png` (one image, the
  default) or JSON `{"images": [base64 PNG], "seed": n}`. Out-of-limit requests get 400 with the reason.
- `GET /healthz`: 200 once the model is loaded (503 before and while draining, 500 when loading failed).
- `GET /metrics`: Prometheus metrics.

One pipeline serves one request at a time (a lock); images of a request are generated in chunks of `maxBatchSize`.
A `modelUri` is a diffusers folder, a single-file checkpoint (`model.safetensors`, SD key layout) or LoRA weights.
When loading fails the process exits 1 with the error in the termination message (`TERMINATION_MESSAGE_PATH`).
On SIGTERM it stops accepting, lets requests in flight finish (at most `DRAIN_SECONDS`) and exits 0.

- `protocol.py`: the request body, the server config loader, and the HTTP helpers (auth, lengths, error codes).
- `runner.py`: `ModelRunner`, the loaded pipeline and its adapters (limits, generation).
- `server.py`: the HTTP server, draining, and `main` (the console script).
- `metrics.py`: the server's Prometheus metrics.
"""
