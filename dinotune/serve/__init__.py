"""``dinotune serve``: a small HTTP prediction server with a page (FastAPI + uvicorn, the ``serve``
extra). ``create_app(predictor)`` builds the app for any predictor (``predictors.py``: a trained
run, or an exported ONNX model); ``run_server`` is the command."""

from typing import Any

__all__ = ["Predictor", "RunPredictor", "create_app", "open_predictor", "run_server"]


def __getattr__(name: str) -> Any:
    # Lazy: the predictors need no web framework; the app needs fastapi (an optional extra).
    if name in ("Predictor", "RunPredictor", "open_predictor"):
        from dinotune.serve import predictors

        return getattr(predictors, name)
    if name in ("create_app", "run_server"):
        from dinotune.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'dinotune.serve' has no attribute {name!r}")
