"""`dreambooth-serve`: an OpenAI-compatible image server (FastAPI on uvicorn) for a trained model and its LoRA
subjects, in vLLM's three layers: protocol types, thin routes, a batching engine.

Configuration: `env.SERVE_CONFIG` (a `dreambooth_api.serving.ServeConfig`, as the operator sets it) and flags on top
(`dreambooth-serve --model-uri URI [--adapter NAME=URI ...] [--adapter-prefix URI] [--port N]`, `config.py`);
`env.SERVE_TOKEN`, when set, is the bearer token (an empty one is an error at start, never "auth off").

Endpoints: `POST /v1/images/generations` and `GET /v1/models` (OpenAI's Images and Models APIs; errors in OpenAI's
envelope), `GET /healthz` (alive), `GET /readyz` (loaded and warmed up), `GET /metrics`, `GET /openapi.json`.
docs/contracts.md has the whole contract (limits, subjects file, metrics, the batching tolerance).

- `protocol.py`: the OpenAI request, response and error types.
- `app.py`: the FastAPI app: thin routes, the error envelope, auth and body-size guards, request metrics.
- `images.py`: a request checked against the limits, resolved to subjects, queued, awaited and answered.
- `engine.py`: the dynamic batching engine (bounded queue, deadlines, one worker thread over the pipeline).
- `adapters.py`: LoRA subjects loaded on first use, in an LRU bounded by count and bytes.
- `subjects.py`: which subjects exist (config, the re-read subjects file, the adapter prefix).
- `runner.py`: the pipeline: loading the three kinds of modelUri, one batched pipeline call.
- `config.py`: the config document, flags and token. `server.py`: the process, drain, `main`.
- `metrics.py`: the Prometheus metrics.
"""
