"""`food101 serve-model`: the champion's ONNX model behind HTTP (Starlette on uvicorn, ONNX Runtime inside).

POST /predict with a JPEG or PNG (the raw body, or a multipart field `file`) -> the top-5 dishes
with probabilities as JSON. GET /health -> the model being served. Photos are decoded exactly as
the preprocess stage decodes the cache (tasks.preprocess.load_image), so the server's answer for
a test photo is the evaluation's. A body over the size limit, an empty body, a non-image and a
decompression bomb are 4xx answers with a one-line reason; the server goes on answering.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from food101.errors import Food101Error
from food101.io import read_json
from food101.onnx_inference import INPUT_NAME, OUTPUT_NAME, session, softmax

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 10 * 2**20  # a phone photo is a few MB
MAX_PIXELS = 40_000_000  # Food-101 photos are at most 512 px a side; a bomb decodes to gigabytes
TOP_K = 5


class BadPhoto(Food101Error):
    """The uploaded bytes are not a photo the model can read; `status` is the HTTP answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ServedModel:
    """One ONNX model and what a request needs to use it."""

    session: Any
    preprocess: dict[str, Any]
    name: str  # "resnet50 (version 3, onnxruntime int8)"

    @classmethod
    def from_files(cls, onnx_path: Path, preprocess_path: Path, name: str, threads: int = 1) -> ServedModel:
        return cls(session(onnx_path, threads), read_json(preprocess_path), name)

    def decode(self, data: bytes) -> np.ndarray:
        """(1, crop, crop, 3) uint8 exactly as the cache holds photos; BadPhoto for anything else."""
        from PIL import Image, UnidentifiedImageError

        from tasks.preprocess import load_image

        if not data:
            raise BadPhoto("the request body is empty: send a JPEG or PNG photo")
        try:
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                width, height = header.size
                kind = header.format
        except Image.DecompressionBombError as exc:
            raise BadPhoto(f"the image is too large to be a photo ({exc})", 413) from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise BadPhoto("the body is not an image Pillow can read: send a JPEG or PNG photo", 415) from exc
        if kind not in ("JPEG", "PNG"):
            raise BadPhoto(f"the body is a {kind} image: send a JPEG or PNG photo", 415)
        if width * height > MAX_PIXELS:
            raise BadPhoto(f"the image is {width}x{height} pixels, over {MAX_PIXELS:,}: send a smaller photo", 413)
        try:
            pixels = load_image(io.BytesIO(data), self.preprocess["resize"], self.preprocess["crop"])
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise BadPhoto(f"the photo cannot be decoded ({exc}): send an intact JPEG or PNG") from exc
        return pixels[None]

    def predict(self, pixels: np.ndarray, k: int = TOP_K) -> list[dict[str, Any]]:
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
        probs = softmax(logits.astype(np.float64))[0]
        order = np.argsort(-probs, kind="stable")[:k]
        classes, display = self.preprocess["classes"], self.preprocess["display"]
        return [{"class": classes[i], "dish": display[i], "probability": float(probs[i])} for i in order]


def build_app(served: ServedModel, max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """The Starlette application: /health and /predict."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": served.name})

    async def read_limited(request: Request) -> bytes | None:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            return None
        body = bytearray()
        async for chunk in request.stream():  # a missing or false Content-Length is counted here
            body += chunk
            if len(body) > max_body_bytes:
                return None
        return bytes(body)

    async def predict(request: Request) -> JSONResponse:
        limit = f"the body is over the {max_body_bytes // 2**20} MB limit: send a smaller photo"
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                if not (request.headers.get("content-length") or "0").isdigit() or \
                        int(request.headers.get("content-length") or 0) > max_body_bytes:
                    return error(413, limit)
                form = await request.form(max_files=1, max_fields=5, max_part_size=max_body_bytes)
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    return error(400, "the multipart form has no file field 'file': send the photo as 'file'")
                data: bytes | None = await upload.read()
            else:
                data = await read_limited(request)
        except ClientDisconnect:
            return error(400, "the client disconnected before the body arrived")
        if data is None:
            return error(413, limit)
        try:
            # one hop to the thread pool per request: each hop costs a context switch
            top = await run_in_threadpool(lambda: served.predict(served.decode(data)))
        except BadPhoto as exc:
            return error(exc.status, str(exc))
        return JSONResponse({"model": served.name, "top": top})

    return Starlette(routes=[Route("/health", health, methods=["GET"]),
                             Route("/predict", predict, methods=["POST"])])


def serve(served: ServedModel, host: str, port: int, max_body_bytes: int = MAX_BODY_BYTES) -> int | None:
    """Run the server until Ctrl-C or SIGTERM (from the main thread); returns the signal that stopped it.

    uvicorn shuts down gracefully on those signals, then raises the signal again for the handler it
    found: ours records it, so a stopped server is a clean exit rather than a death by signal.
    """
    import signal

    import uvicorn

    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    log.info("serving %s on http://%s:%d (POST /predict, GET /health)", served.name, host, port)
    try:
        uvicorn.run(build_app(served, max_body_bytes), host=host, port=port, log_level="warning",
                    limit_concurrency=64, timeout_keep_alive=5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        log.info("stopped on %s", signal.Signals(received[0]).name)
    return received[0] if received else None
