"""Inference without torch: an exported model (``dinotune export RUN --format onnx``) run with
onnxruntime, its pre- and post-processing in numpy and Pillow, giving the records
``dinotune predict`` gives for the run.

    from dinotune.runtime import load_predictor
    predictor = load_predictor("exported/")          # model.onnx + dinotune_export.json
    records = predictor.predict(["photo.jpg"])       # as dinotune predict RUN photo.jpg
    record = predictor.predict_array(rgb_uint8, "upload.jpg")

Nothing here imports torch (a test imports it with torch blocked): a deployment needs onnxruntime,
numpy, Pillow, PyYAML (tifffile for multi-band TIFF) and this package, installed without its other
dependencies (``pip install --no-deps dinotune``). Each task's part (its input, records, files,
page view) is its ``RuntimeTask`` in ``tasks/<name>/runtime.py``, found through the task registry.
"""

from dinotune.data.input_spec import InputSpec
from dinotune.runtime.metadata import EXPORT_META, ExportInfo
from dinotune.runtime.predictor import Predictor, load_predictor
from dinotune.runtime.task import RuntimeTask

__all__ = ["EXPORT_META", "ExportInfo", "InputSpec", "Predictor", "RuntimeTask", "load_predictor"]
