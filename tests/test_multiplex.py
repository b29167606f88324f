"""Issue L: MultiplexedModel, Serve's multiplexing through the node cache (real Serve over HTTP, real MLflow
server, artifacts on real S3 behind the counting proxy).

Six registered models, each a constant regressor predicting its own number (so every answer says which model
made it), served by 2 replicas that hold 2 models each (max_models_per_replica from user_config): more ids
than places, so Serve evicts and reloads. Beside it, Serve's multiplexing as its docs write it
(`mlflow.pyfunc.load_model` in a `@serve.multiplexed` loader: serving.examples.SeedMultiplexed) on the same
models, so the saving is measured against the way without the cache.
"""
from __future__ import annotations

import concurrent.futures
import warnings

import pytest
import requests

from tests import harness
from tests.test_serving import apply_config, app_status, replica_env, replicas_of, serve_url, wait_for  # noqa: F401

pytestmark = pytest.mark.timeout(1200)
N_MODELS, REPLICAS, PER_REPLICA = 6, 2, 2
HEADER = "serve_multiplexed_model_id"
TEMPLATE = "models:/{model_id}@champion"


def register_constant_models(env: dict, n: int, prefix: str = "mux") -> dict[str, float]:
    """n registered models `<prefix>-<i>`, alias champion, each predicting the constant 10 + i."""
    import mlflow
    import numpy as np
    from mlflow import MlflowClient
    from sklearn.dummy import DummyRegressor

    out = {}
    X = np.zeros((4, 2))
    with harness.mlflow_env(env), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = MlflowClient()
        for i in range(n):
            name, value = f"{prefix}-{i}", 10.0 + i
            model = DummyRegressor(strategy="constant", constant=value).fit(X, np.full(4, value))
            with mlflow.start_run(run_name=name):
                info = mlflow.sklearn.log_model(model, name="model", input_example=X[:1], registered_model_name=name,
                                                pip_requirements=["scikit-learn"])
            client.set_registered_model_alias(name, "champion", str(info.registered_model_version))
            out[name] = {"value": value, "model_id": info.model_id}
    return out


@pytest.fixture(scope="module")
def models(mlflow_direct):
    return register_constant_models(mlflow_direct.env(), N_MODELS)


def app_configs(env: dict, per_replica: int = PER_REPLICA) -> list[dict]:
    """Both apps, declaratively (as `serve deploy` would): a changed user_config is then a reconfigure."""
    deployment = {"num_replicas": REPLICAS, "ray_actor_options": {"num_cpus": 0.1}}
    return [{"name": "mux-ours", "route_prefix": "/ours", "import_path": "serving.examples:multiplexed_app",
             "runtime_env": env, "deployments": [{**deployment, "name": "Models", "user_config": {
                 "model_uri_template": TEMPLATE, "max_models_per_replica": per_replica}}]},
            {"name": "mux-seed", "route_prefix": "/seed", "import_path": "serving.examples:seed_multiplexed_app",
             "runtime_env": env, "args": {"model_uri_template": TEMPLATE, "max_models_per_replica": PER_REPLICA},
             "deployments": [{**deployment, "name": "SeedMultiplexed"}]}]


@pytest.fixture(scope="module")
def apps(serve_url, mlflow_direct, models, tmp_path_factory):  # noqa: F811
    """Both apps, started together: ours (MultiplexedModel) and the docs' way (SeedMultiplexed)."""
    cache = tmp_path_factory.mktemp("mux-cache")
    env = replica_env(mlflow_direct.env(), cache)
    apply_config(app_configs(env))
    try:
        wait_for(lambda: app_status("mux-ours") == app_status("mux-seed") == "RUNNING", timeout=300,
                 what="both apps RUNNING")
        yield {"ours": f"{serve_url}/ours", "seed": f"{serve_url}/seed", "cache": cache, "env": env}
    finally:
        apply_config([])   # removes the declaratively deployed apps
        wait_for(lambda: app_status("mux-ours") is None and app_status("mux-seed") is None, what="apps deleted")


def ask(url: str, model_id: str, body: dict | None = None) -> requests.Response:
    return requests.post(url, json={"inputs": [[0.0, 0.0]]} if body is None else body, headers={HEADER: model_id},
                         timeout=120)


def weight_gets(s3, model_id: str) -> int:
    """GETs of the model's files at the S3 server (path-style targets name the logged model's id)."""
    paths = [t.split("?")[0] for method, t, _rng in s3.proxy.request_log() if method == "GET"]
    return sum(1 for p in paths if model_id in p and p.endswith("MLmodel"))


# --- 1. concurrent first requests for one id: one download on the node -------------------------------------
def test_concurrent_first_requests_for_one_id_download_once(apps, models, s3):
    name = f"mux-{N_MODELS - 1}"          # asked for by no test before this one
    s3.reset_stats()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: ask(apps["ours"], name), range(8)))
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
    assert {r.json()["predictions"][0] for r in answers} == {models[name]["value"]}
    assert weight_gets(s3, models[name]["model_id"]) == 1, s3.proxy.request_log()


# --- 2. every answer from the requested model; the second cycle moves nothing --------------------------------
def test_cycling_all_ids_twice_moves_each_model_once(apps, models, s3):
    names = sorted(models)
    cycles = []
    for app in ("ours", "seed"):
        for _ in range(2):
            s3.reset_stats()
            for name in names:
                r = ask(apps[app], name)
                assert r.status_code == 200, (app, name, r.text)
                doc = r.json()
                assert doc["predictions"] == [models[name]["value"]], (app, name, doc)
                if app == "ours":
                    assert (doc["model"], doc["model_id"], doc["version"]) == (name, name, "1"), doc
            cycles.append((app, s3.stats()["bytes_out"], {n: weight_gets(s3, models[n]["model_id"]) for n in names}))
    (_, ours1, gets1), (_, ours2, gets2), (_, seed1, _s1), (_, seed2, seed_gets2) = cycles
    print(f"\n{N_MODELS} ids, {REPLICAS} replicas x {PER_REPLICA} places, cycled twice; origin bytes per cycle: "
          f"MultiplexedModel {ours1}, {ours2}; mlflow.pyfunc.load_model in @serve.multiplexed {seed1}, {seed2}")
    # Ours: each model at most once from the origin (mux-5 came in test 1), none in the second cycle.
    assert all(n <= 1 for n in gets1.values()) and sum(gets1.values()) >= N_MODELS - 1, gets1
    assert ours2 == 0 and sum(gets2.values()) == 0, gets2
    # The docs' way: 6 ids in 4 places, so the second cycle downloads the evicted ones again.
    assert seed2 > 0 and sum(seed_gets2.values()) >= N_MODELS - REPLICAS * PER_REPLICA, seed_gets2

    # max_models_per_replica came from user_config (Serve's own default would be 3).
    rows = wait_for(lambda: (lambda rs: rs if len(rs) == REPLICAS else False)(replicas_of("mux-ours")),
                    what="both replicas' status")
    held = [len(r["models"]) for r in rows]
    assert max(held) == PER_REPLICA and all(n <= PER_REPLICA for n in held), rows
    for row in rows:
        for name, info in row["models"].items():
            assert info["state"] == "loaded" and info["path"].startswith(str(apps["cache"])), info


# --- 3. an unknown id is a 404, a bad payload a 400, no id a 400 -------------------------------------------
def test_unknown_ids_and_bad_requests(apps, models):
    r = ask(apps["ours"], "no-such-model")
    assert r.status_code == 404, r.text
    doc = r.json()
    assert "no-such-model" in doc["error"] and "\n" not in doc["error"], doc
    r = ask(apps["ours"], "bad/id")
    assert r.status_code == 404 and "\n" not in r.json()["error"], r.text
    r = ask(apps["ours"], "mux-0", {"features": [[0.0, 0.0]]})
    assert r.status_code == 400 and "\n" not in r.json()["error"], r.text
    r = requests.post(apps["ours"], json={"inputs": [[0.0, 0.0]]}, timeout=60)
    assert r.status_code == 400 and HEADER in r.json()["error"], r.text
    assert ask(apps["ours"], "mux-0").status_code == 200   # the replica keeps answering


# --- 4. pre-warmed ids: a first request moves nothing from the origin ------------------------------------------
def test_prewarmed_ids_answer_their_first_request_from_the_node_cache(apps, mlflow_direct, s3, use_env,
                                                                      monkeypatch):
    """What `prefetch daemon --model-template T --model-ids ...` declares, warmed here in the driver into the
    replicas' cache: the first request for each id then reads local disk only (test 1's cold id: 1 download)."""
    import prefetch
    from prefetch.templates import expand

    extra = register_constant_models(mlflow_direct.env(), 2, prefix="prewarmed")
    use_env(mlflow_direct.env())
    monkeypatch.setenv("PREFETCH_CACHE_DIR", str(apps["cache"]))
    for uri in expand(TEMPLATE, sorted(extra)):
        prefetch.warm(uri)
    s3.reset_stats()
    for name, rec in sorted(extra.items()):
        r = ask(apps["ours"], name)
        assert r.status_code == 200 and r.json()["predictions"] == [rec["value"]], r.text
    assert s3.stats()["bytes_out"] == 0, s3.proxy.request_log()


# --- 5. the daemon's template flags: expansion, and bad input before Ray is touched ----------------------------
def test_daemon_template_flags_expand_ids_and_reject_bad_input():
    from prefetch.templates import expand
    from tests.helpers import assert_clean_error, run_cli

    assert expand(TEMPLATE, ["a", "b", "a"]) == ["models:/a@champion", "models:/b@champion"]
    assert_clean_error(run_cli("daemon", "--model-template", "models:/{model}@champion", "--model-ids", "a,b"), 2,
                       "{model}")
    assert_clean_error(run_cli("daemon", "--model-template", TEMPLATE), 2, "--model-ids")
    assert_clean_error(run_cli("daemon", "--model-template", "models:/{model_id}", "--model-ids", "a"), 2,
                       "models:/a")


# --- 6. a new max_models_per_replica in user_config: a reconfigure, honoured, same replicas ----------------------
def test_a_new_maximum_in_user_config_is_a_reconfigure_that_serve_honours(apps, models, s3):
    before = {r["replica"] for r in replicas_of("mux-ours")}
    apply_config(app_configs(apps["env"], per_replica=1))
    wait_for(lambda: all((r.get("config") or {}).get("max_models_per_replica") == 1 for r in replicas_of("mux-ours")),
             what="both replicas on the new user_config")
    s3.reset_stats()
    for name in sorted(models) * 2:
        r = ask(apps["ours"], name)
        assert r.status_code == 200 and r.json()["predictions"] == [models[name]["value"]], r.text
    rows = replicas_of("mux-ours")
    assert {r["replica"] for r in rows} == before                      # reconfigured, not restarted
    assert [len(r["models"]) <= 1 for r in rows] == [True] * REPLICAS, rows
    assert s3.stats()["bytes_out"] == 0                                # reloads after eviction: local disk
