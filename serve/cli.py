"""``modrt serve OUT/``: the bundle behind a KServe v2 HTTP server (uvicorn), and with
``--grpc-port`` the v2 gRPC protocol beside it in the same event loop (``grpc_server.py``).

Order matters: the bundle is loaded and validated first (a bad bundle is one red line,
exit 1, and no port is taken), then the port is bound by us (in use: one line, exit 1; the
gRPC port is tried the same way), then uvicorn serves on that socket. SIGTERM / Ctrl-C: readiness turns false, in-flight
requests finish, the batcher drains, exit 0.
"""

from __future__ import annotations

import socket

import click

from modrt._cli_types import PROVIDER, STRATEGY, STRATEGY_HELP
from modrt._exceptions import ModrtError
from modrt.serve.batcher import BatchConfig
from modrt.serve.config import LOG_LEVELS, ServeConfig


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); raises ModrtError when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says TCP; without it Nagle + delayed ACK add ~40 ms per keep-alive request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ModrtError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def run_server(directory: str, config: ServeConfig, announce=click.echo) -> None:
    """Load, bind, serve until a signal; the whole of ``modrt serve``."""
    try:
        import uvicorn

        from modrt.serve.app import create_app
        from modrt.serve.dataplane import DataPlane
    except ModuleNotFoundError as exc:
        raise ModrtError(f"modrt serve needs the serve extra ({exc.name} is not installed): "
                         "pip install 'modrt[serve]'") from exc
    import modrt

    grpc = None
    if config.grpc_port is not None:
        try:
            from modrt.serve.grpc_server import GrpcServer
        except ModuleNotFoundError as exc:
            raise ModrtError(f"modrt serve --grpc-port needs the serve extra ({exc.name} is not installed): "
                             "pip install 'modrt[serve]'") from exc
    def loader():
        return modrt.load(directory, provider=config.provider, strategy=config.strategy)

    model = loader()
    plane = DataPlane(model, config.model_name, config.batch, max_tokens=config.max_tokens,
                      max_response_bytes=config.max_response_bytes, loader=loader)
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    if config.grpc_port is not None:
        if config.grpc_port:  # in use: one line now, not a failed startup later (gRPC binds in the loop)
            try:
                bind(config.host, config.grpc_port).close()
            except ModrtError:
                sock.close()
                raise
        grpc = GrpcServer(plane, config.host, config.grpc_port, config.max_request_bytes, config.max_response_bytes,
                          announce=announce)
    watch = None
    if config.watch:
        from modrt.serve.watch import Watcher

        watch = Watcher(plane, directory, config.watch)
    app = create_app(plane, config.max_request_bytes, grpc, watch)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            plane.ready = False  # new requests get 503 while in-flight ones finish
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a graceful stop is a normal exit, not a re-raised signal

    # http/loop "auto": httptools and uvloop when installed (the serve extra), else h11 + asyncio.
    uv = uvicorn.Config(app, http="auto", loop="auto", log_level=config.log_level,
                        access_log=config.log_level in ("info", "debug", "trace"),
                        timeout_graceful_shutdown=30, server_header=False)
    url_host = f"[{host}]" if ":" in host else host
    announce(f"modrt serve: model {plane.name!r} ({model.topology}, {model.provider}, max batch "
             f"{config.batch.max_batch}, max queue delay {config.batch.max_queue_delay_us} us) on http://{url_host}:{port}")
    try:
        Server(uv).run(sockets=[sock])
    finally:
        sock.close()


@click.command("serve")
@click.argument("bundle_dir", metavar="OUT/", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=9000, show_default=True, type=int, help="TCP port; 0 picks a free one.")
@click.option("--grpc-port", default=None, type=click.IntRange(0, 65535),
              help="Also serve the KServe v2 gRPC protocol (tritonclient.grpc, KServe clients) on this port; "
                   "0 picks a free one. Same model, checks and batches as HTTP.")
@click.option("--model-name", default=None, help="Name clients use in /v2/models/NAME [default: the task name].")
@click.option("--max-batch", default=32, show_default=True, type=int,
              help="Rows merged into one runtime call (1: no dynamic batching).")
@click.option("--max-queue-delay-us", default=1000, show_default=True, type=int,
              help="How long a request may wait for others to join its batch.")
@click.option("--provider", default="auto", show_default=True, type=PROVIDER,
              help="ONNX Runtime execution provider.")
@click.option("--strategy", type=STRATEGY, default="auto", show_default=True, help=STRATEGY_HELP)
@click.option("--max-request-bytes", default=64 * 2**20, show_default=True, type=int,
              help="Larger request bodies get 413.")
@click.option("--max-tokens", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Positions one request may ask for (rows x time steps; rows for a feed-forward model); "
                   "more get 413 before anything runs. A batch holds at most this many too.")
@click.option("--max-response-bytes", default=64 * 2**20, show_default=True, type=click.IntRange(min=1),
              help="Largest answer, estimated from the request's shapes and outputs before it runs; larger "
                   "requests get 400 (ask for next_token only, binary data, or fewer tokens).")
@click.option("--watch", default=None, type=click.FloatRange(min=0.05), metavar="SECONDS",
              help="Poll the bundle's manifest.json this often; when it changes, load the new bundle and swap "
                   "it in without dropping a request (a bundle that does not load is logged, the old one serves). "
                   "Also: POST /v2/repository/models/NAME/load.")
@click.option("--log-level", default="warning", show_default=True, type=click.Choice(LOG_LEVELS))
def serve(bundle_dir: str, host: str, port: int, grpc_port: int | None, model_name: str | None, max_batch: int,
          max_queue_delay_us: int, provider: str, strategy: str, max_request_bytes: int, max_tokens: int,
          max_response_bytes: int, watch: float | None, log_level: str) -> None:
    """Serve a bundle over HTTP (and gRPC, --grpc-port) with the KServe v2 / Open Inference Protocol.

    \b
    curl localhost:9000/v2/health/ready
    curl localhost:9000/v2/models/NAME
    curl -d '{"inputs":[{"name":"tokens","datatype":"INT64","shape":[1,3],"data":[1,2,3]}]}' \\
         localhost:9000/v2/models/NAME/infer
    """
    try:
        config = ServeConfig(host=host, port=port, grpc_port=grpc_port, model_name=model_name,
                             batch=BatchConfig(max_batch=max_batch, max_queue_delay_us=max_queue_delay_us),
                             provider=provider, strategy=strategy, max_request_bytes=max_request_bytes,
                             max_tokens=max_tokens, max_response_bytes=max_response_bytes, watch=watch,
                             log_level=log_level)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    run_server(bundle_dir, config, announce=lambda line: click.echo(line, err=True))
