"""Several replicas of the server behind one endpoint, on Ray Serve.

Each replica is a process of its own with its own engine (and KV cache); Ray Serve's HTTP proxy
spreads requests over them (power of two choices on queue length) and streams responses back.
Within a replica requests are batched continuously as usual.  Ray runs on one machine or on a
cluster (``ray start --head`` / ``--address``); nothing here depends on which.

    onnxgen serve --replicas 2 --port 8000        # needs `pip install "ray[serve]"`
"""

from __future__ import annotations

import os


def replica_app(model: str | None, image_model: str | None, api_key: str | None, max_waiting: int,
                engine_options: dict, no_images: bool):
    """A Ray Serve application of our FastAPI app, built on each replica when it starts."""
    from ray import serve

    def build():
        from .server import build_app

        app = build_app(model=model, image_model=image_model, api_key=api_key, max_waiting=max_waiting,
                        engine_options=engine_options, no_images=no_images)

        @app.get("/replica")
        async def replica():  # which replica answered (for tests and load-balancer checks)
            return {"pid": os.getpid()}

        return app

    @serve.ingress(build)
    class OnnxgenReplica:
        pass

    return serve.deployment(OnnxgenReplica, name="onnxgen")


def run(num_replicas: int, host: str, port: int, threads_per_replica: int | None = None, blocking: bool = True,
        **app_options):
    """Start Ray (locally unless RAY_ADDRESS says otherwise), Serve's proxy on host:port, and the replicas."""
    try:
        import ray
        from ray import serve
    except ImportError as error:
        raise NotImplementedError('replicas need Ray Serve: pip install "ray[serve]"') from error
    threads = threads_per_replica or max(1, (os.cpu_count() or 1) // num_replicas)
    app_options["engine_options"] = {**app_options.get("engine_options", {}), "threads": threads}
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    deployment = replica_app(**app_options).options(num_replicas=num_replicas,
                                                    ray_actor_options={"num_cpus": 0})
    serve.run(deployment.bind(), name="onnxgen", route_prefix="/", blocking=blocking)


def shutdown() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
