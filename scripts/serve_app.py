"""The Ray Serve guide's MLflow example, rewritten on RegistryModel.

The app lives in the installed module `serving.examples` (so `serve deploy`, which refuses a local
working_dir, can import it on every node); this file re-exports it for `serve run`:

    serve run scripts.serve_app:app                    # from the repo root, code defaults
    serve run scripts/serve_config.yaml                # the same app with the config's user_config
    serve deploy scripts/serve_config.yaml             # onto a running cluster (see serve_config.yaml)

What changed against the guide:
- the model URI is in user_config: `serve deploy` with a new `model_uri` hot-swaps the model in every
  replica (warmed and loaded before the swap; a failed swap keeps the old model) instead of restarting them;
- replicas load from the node-local cache: K replicas on a node download the model once, and a restarted or
  added replica loads it from local disk;
- the guide's request format ({"features": [[...]]} -> {"prediction": [...]}) is kept by overriding
  RegistryModel.handle(); `GET /-/model` says which version a replica serves.
"""
from serving.examples import SEED_MODEL_URI, MLflowModelDeployment, Model, SeedModel, app, model_app  # noqa: F401

if __name__ == "__main__":
    import argparse

    from ray import serve

    p = argparse.ArgumentParser(description="Run the guide's example on RegistryModel (Ctrl-C stops it).")
    p.add_argument("--model-uri", default=SEED_MODEL_URI)
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(SeedModel.options(user_config={"model_uri": args.model_uri}).bind(), blocking=True)
