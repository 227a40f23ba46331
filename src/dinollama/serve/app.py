"""``dinollama serve``: one engine, many front doors (OpenAI, llama.cpp, a web page), on FastAPI + uvicorn.

The server listens at once and loads the models in a thread: ``/health`` answers 503 until they are
ready, then 200. SIGTERM stops accepting, lets the requests in flight finish, then exits 0 (uvicorn's
graceful shutdown, then the engine thread stops).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from importlib import resources

from fastapi import APIRouter, FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, PlainTextResponse

from .. import __version__
from . import llama_api, openai_api
from .errors import ApiKey, BodyLimit, error_response, install_handlers
from .state import ServeConfig, State
from .worker import EngineWorker

log = logging.getLogger("dinollama.serve")


def load_models(state: State) -> None:
    """Load the code model (and the vision model), start the engine; errors go to ``/health``."""
    import torch

    from ..cli.code import KV_DTYPES
    from ..cli.options import default_device, resolve_dtype
    from ..codellama import Generator, load, optimize_for_inference
    from ..codellama.engine import Engine

    c = state.config
    device = c.device or default_device()
    try:
        model, tokenizer = load(c.model, dtype=resolve_dtype(c.dtype, device), device=device)
        if tokenizer is None:
            raise FileNotFoundError(f"{c.model}/tokenizer.model: the model folder needs its tokenizer")
        ctx = c.ctx or min(4096, model.params.max_seq_len)  # per slot, as llama-server's default context
        if c.ctx:
            model.set_context(c.ctx)
        kv = KV_DTYPES.get(c.kv_dtype, model.tok_embeddings.weight.dtype)
        optimize_for_inference(model, rows_hint=c.parallel)
        engine = Engine(model, c.parallel, ctx, kv, c.prefill_chunk, c.decode_chunk)
        state.generator = Generator(model, tokenizer, kv_dtype=kv)
        state.worker = EngineWorker(engine, c.max_queue)
        state.worker.start()
        if c.vision_model:
            from .vision import ImageEmbedder

            state.vision = ImageEmbedder(c.vision_model, device=device)
        state.model_name = "default" if c.model == "default" else str(c.model).rstrip("/").split("/")[-1]
        state.ready = True
        log.info("ready: %s, %d slots x %d tokens, kernels %s", state.model_name, c.parallel, ctx,
                 torch.backends.cpu.get_cpu_capability())
    except Exception as e:  # noqa: BLE001 - shown by /health and the log, in one line
        state.load_error = f"the model failed to load: {' '.join(str(e).split())}"
        log.error(state.load_error)


def metrics_text(state: State) -> str:
    """Prometheus text format."""
    m = state.metrics
    lines = ["# TYPE dinollama_requests_total counter"]
    lines += [f'dinollama_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(m.requests.items())]
    lines += ["# TYPE dinollama_request_seconds_sum counter"]
    lines += [f'dinollama_request_seconds_sum{{route="{r}"}} {v:.6f}' for r, v in sorted(m.latency_sum.items())]
    engine = state.worker.engine if state.worker else None
    counters = engine.counters if engine else {}
    for name, key in (("prompt_tokens_total", "prompt_tokens"), ("cached_prompt_tokens_total", "cached_tokens"),
                      ("generated_tokens_total", "generated_tokens"), ("engine_steps_total", "steps")):
        lines += [f"# TYPE dinollama_{name} counter", f"dinollama_{name} {counters.get(key, 0)}"]
    lines += ["# TYPE dinollama_time_to_first_token_seconds summary",
              f"dinollama_time_to_first_token_seconds_sum {m.ttft_sum:.6f}",
              f"dinollama_time_to_first_token_seconds_count {m.ttft_count}",
              "# TYPE dinollama_queue_depth gauge", f"dinollama_queue_depth {engine.queued if engine else 0}",
              "# TYPE dinollama_slots_busy gauge", f"dinollama_slots_busy {engine.running if engine else 0}",
              "# TYPE dinollama_slots_total gauge", f"dinollama_slots_total {state.config.parallel}",
              "# TYPE dinollama_images_embedded_total counter", f"dinollama_images_embedded_total {m.images}"]
    return "\n".join(lines) + "\n"


def create_app(config: ServeConfig, load: bool = True) -> FastAPI:
    """The ASGI app; ``load=False`` leaves the models to the caller (``app.state.server``)."""
    state = State(config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        if load:
            threading.Thread(target=load_models, args=(state,), name="dinollama-load", daemon=True).start()
        yield
        if state.worker is not None:
            state.worker.stop()

    app = FastAPI(title="dinollama", version=__version__, lifespan=lifespan,
                  description="Code Llama completions, infilling and chat (OpenAI and llama.cpp APIs) and DINOv2 "
                              "image embeddings, served by one engine.")
    app.state.server = state
    install_handlers(app)
    router = APIRouter()
    openai_api.register(router, state)
    llama_api.register(router, state)
    app.include_router(router)

    @app.get("/health")
    async def health():
        if state.ready:
            return {"status": "ok"}
        return error_response(503, state.load_error or "Loading model", {"Retry-After": "2"})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(metrics_text(state), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files("dinollama.serve").joinpath("index.html").read_text())

    @app.middleware("http")
    async def count(request: HttpRequest, call_next):
        t0 = time.monotonic()
        response = await call_next(request)
        route = request.scope.get("route")
        state.metrics.record(getattr(route, "path", "other"), response.status_code, time.monotonic() - t0)
        return response

    app.add_middleware(ApiKey, key=config.api_key)
    app.add_middleware(BodyLimit, limit=int(config.max_body_mb * 2**20))
    return app


def serve(config: ServeConfig) -> int:
    """Run until SIGINT/SIGTERM; prints the address when the models are ready."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                           timeout_graceful_shutdown=None))
    state: State = app.state.server

    def announce() -> None:
        while not (state.ready or state.load_error) and not server.should_exit:
            time.sleep(0.05)
        if state.ready:
            host = f"[{config.host}]" if ":" in config.host else config.host
            print(f"dinollama serve: ready at http://{host}:{config.port} ({state.model_name}, "
                  f"{config.parallel} slots x {state.ctx} tokens)", flush=True)
        elif state.load_error:
            print(f"dinollama serve: error: {state.load_error}", flush=True)
            server.should_exit = True

    threading.Thread(target=announce, daemon=True).start()
    # uvicorn drains on SIGTERM, restores the handler it found and raises the signal again: with a
    # no-op handler there, a drained server exits 0 instead of dying of the signal
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    return 2 if state.load_error else 0

