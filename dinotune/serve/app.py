"""The prediction server: a FastAPI app around one predictor (``create_app``), and ``run_server``
behind ``dinotune serve``.

Endpoints:
    ``GET /``                the page: upload an image, see the result drawn (static/index.html)
    ``GET /health``          ``{"status", "task", "classes", "model", "input", "max_upload_mb"}``
    ``POST /predict``        the image as the multipart field ``file`` (or the raw request body, named
                             by ``?name=``) -> the prediction record ``dinotune.predict`` returns for
                             that file (``image`` = the upload's name); ``?overlay=1`` adds
                             ``overlay`` (the picture as drawn, and a segmentation mask as a PNG)
    ``POST /similar``        with an index (``serve --index``, or an index served alone): the upload's
                             most similar indexed images, ``?k=`` of them (``dinotune.serve.similar``)
    ``GET /similar/R.jpg``   indexed image ``R`` (a hit's ``row``) as a thumbnail

Bad uploads get a 4xx answer ``{"detail": message}`` (400 no file, 413 too large, 415 not an
image, 422 unreadable or not fitting the model) and the server goes on serving. One lock lets one
request at a time decode its upload, predict and draw: the memory the server needs is one image's
(four 9000 x 9000 PNGs decoded side by side took 4.9 GB), whatever the number of clients.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request as StarletteRequest

from dinotune.config import check_ranges
from dinotune.config.tools import ServeConfig
from dinotune.data.images import DEFAULT_MAX_IMAGE_PIXELS
from dinotune.data.input_spec import InputSpec
from dinotune.errors import ConfigError, DinotuneError
from dinotune.serve.predictors import Predictor
from dinotune.serve.similar import DEFAULT_K, MAX_K, SimilarImages
from dinotune.serve.uploads import Upload, UploadError, decoded_upload

STATIC = Path(__file__).parent / "static"
# Room for the multipart envelope (boundaries, part headers) around a file of the largest size.
_ENVELOPE = 64 * 1024
# The picture sent back with ?overlay=1 is at most this many pixels on its longer side: the page
# shows it, and the response stays small for a 20 MB photo.
OVERLAY_SIDE = 1024
MB = 1024 * 1024
log = logging.getLogger("dinotune.serve")


def create_app(predictor: Predictor, *, max_upload_mb: float = ServeConfig.max_upload_mb,
               title: str = "dinotune", similar: SimilarImages | None = None) -> FastAPI:
    """The app serving ``predictor`` (see ``dinotune.serve.predictors``); uploads over
    ``max_upload_mb`` MB are refused with 413. With ``similar`` (an index, see
    ``dinotune.serve.similar``; the predictor itself when it is one) the app also answers
    ``POST /similar`` and ``GET /similar/{row}.jpg``."""
    check_ranges(ServeConfig(max_upload_mb=max_upload_mb))
    if similar is None and isinstance(predictor, SimilarImages):
        similar = predictor
    for attr in ("task", "class_names", "predict_array"):
        if not hasattr(predictor, attr):
            raise ConfigError(f"{type(predictor).__name__} cannot be served: it has no {attr!r}")
    spec = getattr(predictor, "input_spec", None) or InputSpec()
    runtime = getattr(predictor, "runtime", None)  # the task's RuntimeTask: what the page draws
    max_pixels = int(getattr(predictor, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
    if similar is not None and similar is not predictor:
        theirs = similar.input_spec
        if (theirs.in_channels, theirs.arrays) != (spec.in_channels, spec.arrays):
            raise ConfigError(f"the index takes {theirs.in_channels}-band {'arrays' if theirs.arrays else 'pictures'} "
                              f"and the model {spec.in_channels}-band {'arrays' if spec.arrays else 'pictures'}: "
                              "an upload cannot be both")
    limit = int(max_upload_mb * MB)
    lock = threading.Lock()
    app = FastAPI(title=title, docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    def health() -> dict[str, Any]:
        describe = getattr(predictor, "describe", None)
        view_settings = getattr(predictor, "view_settings", None)
        return {"status": "ok", "task": predictor.task, "classes": list(predictor.class_names),
                "model": describe() if callable(describe) else {"backend": type(predictor).__name__},
                "view": view_settings() if callable(view_settings) else {},
                "input": {"bands": spec.in_channels, "arrays": spec.arrays}, "max_upload_mb": max_upload_mb,
                "similar": similar.health() if similar is not None else None}

    @app.post("/predict")
    async def predict(request: Request, overlay: bool = Query(False, description="add the drawn picture"),
                      name: str = Query("", description="the image's name, for a raw (non-multipart) body")):
        data, filename = await _read_upload(request, limit, max_upload_mb, name)

        def work() -> dict[str, Any]:
            # decoding inside the lock too: a decoded image is the largest thing a request holds
            with lock, decoded_upload(data, filename, spec, max_pixels) as upload:
                if overlay and hasattr(predictor, "predict_view"):
                    record, extras = predictor.predict_view(upload.array, upload.name)
                else:
                    record, extras = predictor.predict_array(upload.array, upload.name), {}
                if overlay:
                    view = runtime.view(record, extras) if runtime is not None else {}
                    offset = getattr(runtime, "colour_offset", 1)
                    drawn = overlay_of(upload, extras.get("mask"), list(predictor.class_names), spec, offset)
                    record = {**record, "overlay": {**drawn, "view": view}}
                return record

        return await _answer(work, filename)

    if similar is not None:
        @app.post("/similar")
        async def find_similar(request: Request,
                               k: int = Query(DEFAULT_K, ge=1, le=MAX_K, description="hits to answer"),
                               name: str = Query("", description="the image's name, for a raw body")):
            data, filename = await _read_upload(request, limit, max_upload_mb, name)

            def work() -> dict[str, Any]:
                with lock, decoded_upload(data, filename, spec, max_pixels) as upload:
                    return similar.similar(upload.array, upload.name, k)

            return await _answer(work, filename)

        @app.get("/similar/{row}.jpg", include_in_schema=False)
        def hit_picture(row: int) -> Response:
            with lock:  # one decoded picture at a time, as for uploads
                jpeg = similar.thumbnail(row)
            if jpeg is None:
                raise HTTPException(404, f"no readable indexed image {row}")
            return Response(jpeg, media_type="image/jpeg")

    return app


async def _answer(work: Callable[[], dict[str, Any]], filename: str) -> dict[str, Any]:
    """``work()`` on a thread, its failures as HTTP answers: 4xx for the upload or the input, 500
    (logged) for anything else, after which the server goes on."""
    try:
        return await run_in_threadpool(work)
    except UploadError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    except DinotuneError as exc:  # the model refused the input (e.g. a size it cannot take)
        raise HTTPException(422, str(exc)) from None
    except Exception as exc:  # a bug or a failing model: said, logged, and the server goes on
        log.exception("prediction of %s failed", filename)
        raise HTTPException(500, f"prediction failed: {type(exc).__name__}: {exc}") from None


async def _read_upload(request: Request, limit: int, max_upload_mb: float, name: str) -> tuple[bytes, str]:
    """The uploaded bytes and the client's file name; 413 as soon as the body passes the limit
    (from Content-Length before reading, else while reading), 400 when there is no file."""
    too_large = f"upload over the limit of {max_upload_mb:g} MB (--max-upload-mb)"
    multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
    allowed = limit + (_ENVELOPE if multipart else 0)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > allowed:
        raise HTTPException(413, f"{too_large}: the request is {_size(int(declared))}")
    limited = StarletteRequest(request.scope, _limited(request.receive, allowed, too_large))
    if not multipart:
        data = await limited.body()
        if not data:
            raise HTTPException(400, "no image: send it as the multipart field 'file' "
                                     "(curl -F file=@photo.jpg http://HOST:PORT/predict) or as the request body")
        return data, name
    async with limited.form(max_files=1, max_fields=10) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(400, "no file: send the image as the multipart field 'file' "
                                     "(curl -F file=@photo.jpg http://HOST:PORT/predict)")
        data = await upload.read()
        filename = upload.filename or name
    if len(data) > limit:
        raise HTTPException(413, f"{too_large}: {filename or 'the file'} is {_size(len(data))}")
    return data, filename


def _size(n: int) -> str:
    return f"{n / MB:.1f} MB" if n >= MB // 10 else f"{n:,} bytes"


def _limited(receive: Callable[[], Awaitable[dict]], limit: int, message: str) -> Callable[[], Awaitable[dict]]:
    """``receive`` that raises 413 once more than ``limit`` body bytes arrived (chunked uploads
    declare no length)."""
    seen = 0

    async def inner() -> dict:
        nonlocal seen
        msg = await receive()
        if msg["type"] == "http.request":
            seen += len(msg.get("body", b""))
            if seen > limit:
                raise HTTPException(413, message)
        return msg

    return inner


# ------------------------------------------------------------------------------------- overlay
def overlay_of(upload: Upload, mask: np.ndarray | None, names: list[str], spec: InputSpec,
               colour_offset: int = 1) -> dict[str, Any]:
    """What the page draws on: ``{"image": JPEG (PNG when small) data URL of the input as shown (band
    arrays through their RGB bands, 2-98 % stretch), "width", "height" (of that picture, at most
    OVERLAY_SIDE), "source_width", "source_height" (of the input: boxes are in these pixels), "mask":
    PNG data URL of the coloured label map at the picture's size or None, "colors": {class:
    "#rrggbb"}}``; class ``i`` takes palette colour ``i + colour_offset`` (the task runtime's: 1 keeps
    black, invisible on dark pictures, for nothing; 0 where label 0 is drawn as a class)."""
    from PIL import Image

    from dinotune.viz.segmentation import palette

    if upload.is_array:
        from dinotune.data.bands import stretch_to_rgb  # band arrays are shown as everywhere in dinotune

        picture = stretch_to_rgb(upload.array, spec.rgb_bands)
    else:
        picture = Image.fromarray(upload.array)
    source = picture.size
    picture.thumbnail((OVERLAY_SIDE, OVERLAY_SIDE))
    offset = colour_offset
    colours = palette(min(len(names) + offset, 256), None)
    # JPEG keeps a large photo's answer small; small pictures, drawn enlarged, stay exact as PNG
    fmt = "PNG" if picture.width * picture.height <= 256 * 256 else "JPEG"
    out: dict[str, Any] = {"image": _data_url(picture, fmt), "width": picture.width, "height": picture.height,
                           "source_width": source[0], "source_height": source[1], "mask": None,
                           "colors": {n: "#%02x%02x%02x" % tuple(colours[(i + offset) % 256]) for i, n in enumerate(names)}}
    if mask is not None:
        rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
        rgba[..., :3] = colours[np.clip(mask, 0, 255)]
        rgba[..., 3] = np.where(mask < len(names), 255, 0)  # labels outside the classes stay clear
        drawn = Image.fromarray(rgba, mode="RGBA").resize(picture.size, Image.Resampling.NEAREST)
        out["mask"] = _data_url(drawn, "PNG")
    return out


def _data_url(image: Any, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


# ----------------------------------------------------------------------------------- the server
def run_server(target: str | Path, *, host: str = ServeConfig.host, port: int = ServeConfig.port,
               device: str = "auto", max_upload_mb: float = ServeConfig.max_upload_mb,
               index: str | Path | None = None) -> None:
    """``dinotune serve``: load ``target`` (a run folder, an exported ONNX model or an index folder)
    and serve it with uvicorn until interrupted; ``index`` adds ``/similar`` for that index."""
    import uvicorn

    from dinotune.serve.predictors import open_predictor
    from dinotune.utils import info

    check_ranges(ServeConfig(host=host, port=port, max_upload_mb=max_upload_mb))  # before a model is loaded
    predictor = open_predictor(target, device=device)
    similar = SimilarImages(index, device=device) if index else None
    app = create_app(predictor, max_upload_mb=max_upload_mb, title=f"dinotune: {Path(target).name}", similar=similar)
    info(f"serving {target} ({predictor.task}, {len(predictor.class_names)} classes) on http://{host}:{port}/ "
         f"(the page at /, POST /predict{', POST /similar' if similar or isinstance(predictor, SimilarImages) else ''}, "
         f"GET /health; uploads up to {max_upload_mb:g} MB)")
    uvicorn.run(app, host=host, port=port, log_level="info")
