"""The HTTP service for the champion: FastAPI, JSON or image uploads, a page to try it.

Endpoints: ``POST /predict`` (JSON pixels, or ``{"texts": [...]}`` for a text model),
``POST /predict/image`` (PNG/JPEG uploads), ``GET /health``, ``GET /ready``, ``GET /model``
and ``GET /`` (draw or upload a digit; a text box when the champion reads texts).
Bad input is a 4xx with a message, never a 500. Optional bearer-token auth: set
``GRAFTLINE_API_TOKEN`` and send ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import io
import math
import os
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.resources import files as resource_files
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, ValidationError

from graftline.serve.batch import prepare_image
from graftline.serve.champion import ChampionFollower, LoadedModel

TOKEN_ENV = "GRAFTLINE_API_TOKEN"
UPLOAD_SCHEMA = {
    "type": "object",
    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
    "required": ["files"],
}


class PredictRequest(BaseModel):
    """A batch of images as pixel arrays (0..255, white digit on black), or of texts for a
    text model."""

    inputs: list[Any] | None = Field(
        default=None,
        description="image models: a list of images; each is flat (C*H*W numbers), HxW or "
        "CxHxW nested lists",
        examples=[[[0.0] * 784]],
    )
    texts: list[Any] | None = Field(
        default=None,
        description="text models: a list of texts (strings); one over the model's max_len "
        "tokens is truncated, and its answer says so",
        examples=[["Great coffee, I buy it every month."]],
    )


class ClassProbability(BaseModel):
    class_: str = Field(alias="class")
    probability: float


class Prediction(BaseModel):
    class_: str = Field(alias="class")
    probability: float
    top: list[ClassProbability]
    truncated: bool | None = Field(
        default=None, description="text models: the text had more than max_len tokens"
    )


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    predictions: list[Prediction]


class Problem(BaseModel):
    detail: str


def _answer(
    loaded: LoadedModel, name: str, proba: np.ndarray, truncated: np.ndarray | None = None
) -> dict[str, Any]:
    k = min(3, len(loaded.classes))
    order = np.argsort(-proba, axis=1)[:, :k]
    preds = []
    for n, (row, top) in enumerate(zip(proba, order, strict=True)):
        pred = {
            "class": loaded.classes[top[0]],
            "probability": float(row[top[0]]),
            "top": [{"class": loaded.classes[i], "probability": float(row[i])} for i in top],
        }
        if truncated is not None:
            pred["truncated"] = bool(truncated[n])
        preds.append(pred)
    return {"model_name": name, "model_version": loaded.version, "predictions": preds}


def _as_texts(texts: list[Any], max_batch: int, max_chars: int) -> list[str]:
    """Validate the texts of a request; raise 4xx naming the first bad item."""
    if not texts:
        raise HTTPException(400, "texts is empty: send at least one text")
    if len(texts) > max_batch:
        raise HTTPException(413, f"batch of {len(texts)} texts is over the limit of {max_batch}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise HTTPException(400, f"texts[{i}]: not a string ({type(text).__name__})")
        if not text.strip():
            raise HTTPException(400, f"texts[{i}]: empty text")
        if len(text) > max_chars:
            raise HTTPException(
                413, f"texts[{i}]: {len(text)} characters is over the limit of {max_chars}"
            )
    return list(texts)


def _as_pixels(inputs: list[Any], shape: tuple[int, int, int], max_batch: int) -> np.ndarray:
    """Validate JSON pixel arrays into float32 ``(N, C, H, W)``; raise 4xx on bad input."""
    if not inputs:
        raise HTTPException(400, "inputs is empty: send at least one image")
    if len(inputs) > max_batch:
        raise HTTPException(413, f"batch of {len(inputs)} images is over the limit of {max_batch}")
    c, h, w = shape
    out = np.empty((len(inputs), c, h, w), dtype=np.float32)
    for i, item in enumerate(inputs):
        try:
            arr = np.asarray(item, dtype=np.float32)
        except (ValueError, TypeError):
            raise HTTPException(
                400, f"inputs[{i}]: not a numeric array (ragged or non-numeric values)"
            ) from None
        if (
            arr.size == c * h * w
            and arr.ndim in (1, 2, 3)
            and (arr.ndim == 1 or arr.shape[-2:] == (h, w))
        ):
            arr = arr.reshape(c, h, w)
        else:
            raise HTTPException(
                400,
                f"inputs[{i}]: shape {list(arr.shape)} does not fit the model's input "
                f"{[c, h, w]} (send {c * h * w} numbers flat, or nested {h}x{w})",
            )
        if not np.isfinite(arr).all():
            raise HTTPException(400, f"inputs[{i}]: contains NaN or Infinity")
        if arr.min() < 0 or arr.max() > 255:
            raise HTTPException(400, f"inputs[{i}]: pixel values must lie in [0, 255]")
        out[i] = arr
    return out


def decode_image(data: bytes, filename: str, transform: dict[str, Any]) -> np.ndarray:
    """An uploaded image of any size and mode, brought to the model's input by the transform
    its training data got (the same polarity rule: a digit model's dark-on-light upload is
    inverted as its training files were; a photo model's never is)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return prepare_image(img, transform)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise HTTPException(400, f"{filename}: not a decodable image ({err})") from None


def create_app(
    follower: ChampionFollower,
    *,
    max_batch: int = 256,
    max_upload_bytes: int = 5 * 1024 * 1024,
    token: str | None = None,
    max_text_chars: int = 100_000,
) -> FastAPI:
    """The service, around a champion follower (started and stopped with the app)."""
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        follower.start()
        yield
        follower.stop()

    app = FastAPI(
        title="graftline",
        summary="Predictions from the champion model, following the registry's alias.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.follower = follower

    def authorize(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip(), token):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    def champion() -> LoadedModel:
        loaded = follower.current
        if loaded is None:
            raise HTTPException(503, f"no model to serve: {follower.reason}")
        return loaded

    @app.exception_handler(HTTPException)
    async def problem(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": exc.detail},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    _status_routes(app, follower, champion, authorize)

    _predict_routes(
        app,
        follower,
        champion,
        authorize,
        max_batch=max_batch,
        max_upload_bytes=max_upload_bytes,
        max_text_chars=max_text_chars,
    )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return resource_files("graftline.serve").joinpath("page.html").read_text()

    return app


def _status_routes(
    app: FastAPI,
    follower: ChampionFollower,
    champion: Callable[[], LoadedModel],
    authorize: Callable[[Request], None],
) -> None:
    """GET /health (the process), /ready (a model is loaded) and /model (what it is)."""

    @app.get("/health", summary="The process is up")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="A model is loaded", responses={503: {"model": Problem}})
    async def ready() -> JSONResponse:
        loaded = follower.current
        if loaded is None:
            return JSONResponse({"ready": False, "reason": follower.reason}, status_code=503)
        answer = {
            "ready": True,
            "model_name": follower.name,
            "model_version": loaded.version,
            "input": "text" if loaded.text else "image",
            "runtime": loaded.info.get("runtime", "torch"),
        }
        if follower.warning:  # it serves, but someone should look
            answer["warning"] = follower.warning
        return JSONResponse(answer)

    @app.get(
        "/model",
        summary="Version, metrics and lineage of the served model",
        dependencies=[Depends(authorize)],
        responses={503: {"model": Problem}},
    )
    async def model_info() -> dict[str, Any]:
        info = champion().info
        return {**info, "warning": follower.warning} if follower.warning else info


def _predict_routes(
    app: FastAPI,
    follower: ChampionFollower,
    champion: Callable[[], LoadedModel],
    authorize: Callable[[Request], None],
    *,
    max_batch: int,
    max_upload_bytes: int,
    max_text_chars: int,
) -> None:
    """POST /predict (JSON pixels or texts, or uploaded files) and /predict/image (files)."""

    @app.post(
        "/predict",
        response_model=PredictResponse,
        response_model_by_alias=True,
        summary="Predict a batch: JSON pixel arrays or uploaded PNG/JPEG files; texts for a "
        "text model",
        dependencies=[Depends(authorize)],
        responses={400: {"model": Problem}, 413: {"model": Problem}, 503: {"model": Problem}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": PredictRequest.model_json_schema()},
                    "multipart/form-data": {"schema": UPLOAD_SCHEMA},
                },
            }
        },
    )
    async def predict(request: Request) -> JSONResponse:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=max_batch + 1)
            uploads = [f for f in form.getlist("files") if not isinstance(f, str)]
            if not uploads:
                raise HTTPException(400, "multipart request without 'files'")
            return await predict_uploads(uploads)
        req = await _json_request(request, max_upload_bytes)
        loaded = champion()  # taken once: the whole request uses this version
        if loaded.text:
            if req.texts is None:
                raise HTTPException(
                    422, 'texts: field required (this model reads texts: {"texts": ["...", ...]})'
                )
            proba, cut = loaded.predict_texts(_as_texts(req.texts, max_batch, max_text_chars))
            return JSONResponse(_answer(loaded, follower.name, proba, cut))
        if req.inputs is None:
            raise HTTPException(
                422, "inputs: field required (this model reads images: pixel arrays, or files)"
            )
        pixels = _as_pixels(req.inputs, loaded.input_shape, max_batch)
        # numpy end to end: no DataFrame on the hot path
        return JSONResponse(_answer(loaded, follower.name, loaded.predict_proba(pixels)))

    @app.post(
        "/predict/image",
        response_model=PredictResponse,
        response_model_by_alias=True,
        summary="Predict uploaded PNG/JPEG images (any size or mode)",
        dependencies=[Depends(authorize)],
        responses={400: {"model": Problem}, 413: {"model": Problem}, 503: {"model": Problem}},
    )
    async def predict_image(files: list[UploadFile] = File(...)) -> JSONResponse:  # noqa: B008
        return await predict_uploads(files)

    async def predict_uploads(files: list[Any]) -> JSONResponse:
        if len(files) > max_batch:
            raise HTTPException(413, f"{len(files)} files is over the limit of {max_batch}")
        loaded = champion()
        if loaded.text:
            raise HTTPException(400, 'this model reads texts: send {"texts": ["...", ...]}')
        images = await _uploaded_images(files, loaded.transform, max_upload_bytes)
        proba = loaded.predict_proba(images)
        return JSONResponse(_answer(loaded, follower.name, proba))


async def _json_request(request: Request, max_bytes: int) -> PredictRequest:
    """A JSON /predict body, refused (413) over ``max_bytes`` and (422) when it is not a
    :class:`PredictRequest`, naming the first bad field."""
    length = int(request.headers.get("content-length") or 0)
    if length > max_bytes:
        raise HTTPException(413, f"payload of {length} bytes is over the limit of {max_bytes}")
    body = await request.body()
    if len(body) > max_bytes:
        raise HTTPException(413, f"payload over the limit of {max_bytes} bytes")
    try:
        return PredictRequest.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise HTTPException(422, f"{where}: {first['msg']}") from None


async def _uploaded_images(
    files: list[Any], transform: dict[str, Any], max_bytes: int
) -> np.ndarray:
    """Uploaded image files as the model's input batch; an empty file (400), one over
    ``max_bytes`` (413) or one that does not decode (400) is refused by name."""
    images = []
    for f in files:
        data = await f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"{f.filename}: over the limit of {max_bytes} bytes")
        if not data:
            raise HTTPException(400, f"{f.filename}: empty file")
        images.append(decode_image(data, f.filename or "upload", transform))
    return np.stack(images)


def serve(
    name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    poll_seconds: float = 2.0,
    max_batch: int = 256,
    max_bytes: int = 5 * 1024 * 1024,
    runtime: str = "torch",
) -> None:
    """Run the service with uvicorn (loopback unless told otherwise), the champion on
    PyTorch or, with ``runtime="onnx"``, its ``model.onnx`` on ONNX Runtime."""
    import torch
    import uvicorn
    from mlflow import MlflowClient

    torch.set_num_threads(max(1, min(2, math.floor(os.cpu_count() or 1))))
    follower = ChampionFollower(name, MlflowClient(), poll_seconds, runtime)
    uvicorn.run(
        create_app(follower, max_batch=max_batch, max_upload_bytes=max_bytes),
        host=host,
        port=port,
        log_level="info",
    )
