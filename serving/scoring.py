"""MLflow's scoring JSON, parsed with MLflow's own parser (so a request that `mlflow models serve` accepts is
accepted here): `dataframe_records`, `dataframe_split`, `inputs` / `instances`, plus optional `params`."""
from __future__ import annotations

import json
from typing import Any

FORMAT_KEYS = ("dataframe_records", "dataframe_split", "inputs", "instances")


class BadRequest(ValueError):
    """The request is not something the model can answer (HTTP 400)."""


def parse_request(body: Any, schema=None) -> tuple[Any, dict | None]:
    """(model input, params) from a scoring request body (already decoded JSON)."""
    if not isinstance(body, dict):
        raise BadRequest(f"expected a JSON object with one of {', '.join(FORMAT_KEYS)}; got {type(body).__name__}")
    keys = [k for k in FORMAT_KEYS if k in body]
    if len(keys) != 1:
        raise BadRequest(f"expected exactly one of {', '.join(FORMAT_KEYS)} in the request; got keys {sorted(body)}")
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    params = body.get("params")
    if params is not None and not isinstance(params, dict):
        raise BadRequest("'params' must be a JSON object")
    try:
        data = infer_and_parse_data({keys[0]: body[keys[0]]}, schema)
    except MlflowException as e:
        raise BadRequest(e.message.splitlines()[0]) from None
    except (ValueError, TypeError, KeyError) as e:
        raise BadRequest(f"cannot read '{keys[0]}': {e}") from None
    return data, params


def jsonable(predictions: Any) -> Any:
    """Predictions as plain JSON values (numpy arrays, pandas frames and series, numpy scalars)."""
    import numpy as np
    import pandas as pd
    from mlflow.utils.proto_json_utils import NumpyEncoder

    # What MLflow's scoring server does (records for frames), with public calls only.
    if isinstance(predictions, np.ndarray):
        predictions = predictions.tolist()
    elif isinstance(predictions, pd.Series):
        predictions = predictions.to_frame().to_dict(orient="records")
    elif isinstance(predictions, pd.DataFrame):
        predictions = predictions.to_dict(orient="records")
    return json.loads(json.dumps(predictions, cls=NumpyEncoder))


def is_client_error(e: BaseException) -> bool:
    """MLflow's schema enforcement and input errors are the caller's fault (400), not the model's (500)."""
    if isinstance(e, BadRequest):
        return True
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:
        return False
    if isinstance(e, MlflowException):
        return e.error_code in ("BAD_REQUEST", "INVALID_PARAMETER_VALUE") or "enforce schema" in e.message
    return False
