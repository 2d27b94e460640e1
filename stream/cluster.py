"""framepack-rt on Ray Serve: many streams over many machines (``framepack-rt serve --cluster ray``).

Two deployments (Ray's own engine does placement, health checks, restarts, autoscaling and multi-node):

* ``ingress`` (stream/ingress.py, one replica, no GPU): the page and the HTTP API behind Serve's HTTP proxy;
* ``generation`` (stream/replica.py, N replicas, each its GPU): the single-machine server, whole, per device.

A new session's offer goes to the generation replica with the fewest sessions (stream/cluster_router.py: all
replicas of one deployment take the same number, so fewest held is most free); a join, and any request about a
session, goes to the replica holding it. Each session is one long Serve request on its replica, so Serve's
autoscaler, given ``target_ongoing_requests`` = sessions per replica, scales on sessions.

    framepack-rt serve --cluster ray --replicas 2                  # a local Ray instance, or RAY_ADDRESS's
    serve run framepack_rt.stream.cluster:build_app model=demo replicas=2   # Ray's own tooling
    serve deploy stream/deploy/serve_config.yaml                          # (KubeRay: stream/deploy/rayservice.yaml)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable

from framepack_rt.stream.ice import parse_port_range, turn_credentials_from_env
from framepack_rt.stream.options import TOKEN_ENV
from framepack_rt.stream.settings import ServerSettings

APP_NAME = "framepack-rt"
API_HEADROOM = 32  # requests a replica takes beside its sessions' streams (joins, listings, downloads)
INGRESS_MAX_REQUESTS = 2000  # the ingress holds each page's /end long-poll open


@dataclass(frozen=True)
class ClusterSettings:
    """How many generation replicas, on what, and the autoscaling bounds (None: a fixed ``replicas``).

    media_host: where viewers' connections go (ICE host candidates): "node" (each replica's Ray node address)
    or one address for all (127.0.0.1 keeps a local cluster on loopback).
    """

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_sessions: float | None = None  # sessions per replica the autoscaler aims for (default: the maximum)
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    media_host: str = "node"
    drain_timeout_s: float = 1800.0  # a replica Serve stops (scale-down, redeploy) waits this long for sessions
    upscale_delay_s: float | None = None  # how long load must stay above target before Serve adds a replica
    downscale_delay_s: float | None = None  # ... below target before it removes one (None: Serve's defaults)
    sequence_parallel: int = 1  # worker processes (GPUs) per replica for one stream (commands/parallel.py)
    cfg_parallel: bool = False
    parallel_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas {self.replicas}: must be at least 1")
        if self.autoscaling:
            low, high = self.min_replicas or 1, self.max_replicas or max(self.replicas, self.min_replicas or 1)
            if not 0 < low <= self.replicas <= high:
                raise ValueError(f"--min-replicas {low}, --replicas {self.replicas}, --max-replicas {high}: need "
                                 "1 <= min <= replicas <= max")
        if self.target_sessions is not None and self.target_sessions <= 0:
            raise ValueError(f"--target-sessions {self.target_sessions}: must be positive")
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise ValueError("--gpus-per-replica and --cpus-per-replica: must be 0 or more")
        if self.sequence_parallel < 1:
            raise ValueError(f"--sequence-parallel {self.sequence_parallel}: must be at least 1")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def deployment_options(self, settings: ServerSettings) -> dict[str, Any]:
        """The generation deployment's Serve options for a server with ``settings``."""
        from ray.serve.config import RequestRouterConfig

        from framepack_rt.stream.cluster_router import SessionRouter

        options: dict[str, Any] = dict(
            ray_actor_options={"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            max_ongoing_requests=settings.max_sessions + API_HEADROOM,
            request_router_config=RequestRouterConfig(request_router_class=SessionRouter),
            health_check_period_s=5, health_check_timeout_s=60,
            # Each session is one ongoing request: a replica being removed gets no new sessions and waits for its
            # sessions to end, up to this long; then Serve kills it and those viewers are told they were lost.
            graceful_shutdown_timeout_s=self.drain_timeout_s)
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas or 1, "initial_replicas": self.replicas,
                "max_replicas": self.max_replicas or max(self.replicas, self.min_replicas or 1),
                "target_ongoing_requests": self.target_sessions or settings.max_sessions,
                **{k: v for k, v in (("upscale_delay_s", self.upscale_delay_s),
                                     ("downscale_delay_s", self.downscale_delay_s)) if v is not None}}
        else:
            options["num_replicas"] = self.replicas
        return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """serve's cluster flags."""
    group = parser.add_argument_group("cluster (Ray Serve; pip install 'framepack-rt[cluster]')")
    group.add_argument("--cluster", choices=["ray"], default=None,
                       help="serve from generation replicas on Ray Serve: a local Ray instance, or the cluster "
                            "RAY_ADDRESS names")
    group.add_argument("--replicas", type=int, default=1, metavar="N",
                       help="generation replicas (with autoscaling: the initial number; default 1)")
    group.add_argument("--min-replicas", type=int, default=None, metavar="N",
                       help="autoscale on sessions per replica, down to N replicas")
    group.add_argument("--max-replicas", type=int, default=None, metavar="N", help="... and up to N replicas")
    group.add_argument("--target-sessions", type=float, default=None, metavar="S",
                       help="sessions per replica the autoscaler aims for (default: --max-sessions)")
    group.add_argument("--gpus-per-replica", type=float, default=0.0, metavar="G",
                       help="GPUs each replica reserves (default: one per worker, --sequence-parallel, when "
                            "the cluster has GPUs, else 0)")
    group.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C",
                       help="CPUs each replica reserves (default 1)")
    group.add_argument("--drain-timeout", type=float, default=1800.0, metavar="SECONDS",
                       help="a replica Serve removes (scale-down, redeploy) waits this long for its sessions to end "
                            "before it is stopped and their viewers are told (default 1800)")
    group.add_argument("--media-host", default="node", metavar="ADDRESS",
                       help="where viewers' connections go: 'node' (each replica's node address; default) or one "
                            "address; a loopback --host keeps everything on loopback")


def settings_from(args: argparse.Namespace) -> ClusterSettings:
    """serve's parsed flags as ClusterSettings (--sequence-parallel N: each replica's world of N workers)."""
    return ClusterSettings(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                           target_sessions=args.target_sessions, gpus_per_replica=args.gpus_per_replica,
                           cpus_per_replica=args.cpus_per_replica, media_host=args.media_host,
                           sequence_parallel=args.sequence_parallel, cfg_parallel=args.cfg_parallel,
                           parallel_timeout=args.parallel_timeout, drain_timeout_s=args.drain_timeout)


def build(settings: ServerSettings, cluster: ClusterSettings) -> Any:
    """The Serve application: the ingress bound to the generation deployment."""
    from ray import serve

    from framepack_rt.stream.ingress import ClusterIngress
    from framepack_rt.stream.replica import GenerationReplica

    generation = serve.deployment(GenerationReplica, name="generation", **cluster.deployment_options(settings))
    ingress = serve.deployment(ClusterIngress, name="ingress", num_replicas=1,
                               max_ongoing_requests=INGRESS_MAX_REQUESTS, ray_actor_options={"num_cpus": 0})
    return ingress.bind(generation.bind(settings, cluster), settings)


CLUSTER_FIELDS = frozenset(f.name for f in dataclasses.fields(ClusterSettings))
SERVER_FIELDS = frozenset(f.name for f in dataclasses.fields(ServerSettings))


def build_app(args: dict[str, Any]) -> Any:
    """The application builder for Ray's tooling: ``serve run framepack_rt.stream.cluster:build_app
    model=demo replicas=2`` or a config file's ``args:``. Keys: ClusterSettings' and ServerSettings' fields
    (values from the command line arrive as text and are converted to the field's type)."""
    unknown = set(args) - CLUSTER_FIELDS - SERVER_FIELDS
    if unknown:
        raise ValueError(f"unknown argument(s) {sorted(unknown)}; known: {sorted(CLUSTER_FIELDS | SERVER_FIELDS)}")
    cluster = ClusterSettings(**{k: _typed(ClusterSettings, k, v) for k, v in args.items() if k in CLUSTER_FIELDS})
    server_args = {k: _typed(ServerSettings, k, v) for k, v in args.items() if k in SERVER_FIELDS}
    # Secrets come from the environment (a config's runtime_env), as serve's flags take them.
    server_args.setdefault("token", os.environ.get(TOKEN_ENV) or None)
    if server_args.get("ice_servers") and "turn_username" not in server_args:
        server_args["turn_username"], server_args["turn_credential"] = turn_credentials_from_env()
    ports = server_args.get("udp_ports")
    if ports is not None:
        server_args["udp_ports"] = parse_port_range(ports) if isinstance(ports, str) else tuple(ports)
    server = ServerSettings(**server_args)
    return build(server, cluster)


def _typed(cls: type, name: str, value: Any) -> Any:
    """``value`` as field ``name`` of ``cls`` takes it (text from ``serve run key=value`` included): by the
    field's annotation, so that a text field (a token of digits) stays text."""
    if not isinstance(value, str):
        return value
    kind = next(f for f in dataclasses.fields(cls) if f.name == name).type  # e.g. "int | None" (postponed)
    if "str" in kind or value.lower() in ("none", "null"):
        return None if value.lower() in ("none", "null") and "None" in kind else value
    if kind.startswith(("tuple", "list")):  # from a config file they arrive as lists; ports as "MIN-MAX" text
        return value
    if kind.startswith("bool"):
        return value.lower() in ("1", "true", "yes", "on")
    if "int" in kind and "float" not in kind:
        return int(value)
    if "float" in kind:
        return float(value)
    return value


def serve_cluster(settings: ServerSettings, cluster: ClusterSettings, host: str = "127.0.0.1", port: int = 8188,
                  announce: Callable[[str], None] = print) -> int:
    """``framepack-rt serve --cluster ray``: join RAY_ADDRESS's cluster or start a local one, deploy, serve
    until SIGINT/SIGTERM, then take the application down (and a local Ray instance with it)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine unless asked
    address = os.environ.get("RAY_ADDRESS")
    loopback = host in ("127.0.0.1", "localhost", "::1")
    if address is None and loopback:
        # Ray's own servers follow the node address: a local instance for a loopback server stays on loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ImportError("--cluster ray needs Ray Serve: pip install 'framepack-rt[cluster]'") from None
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
    try:
        if cluster.gpus_per_replica == 0 and settings.device in ("auto", "cuda") and \
                ray.cluster_resources().get("GPU", 0) > 0:
            # one GPU per worker when the cluster has GPUs
            cluster = dataclasses.replace(cluster, gpus_per_replica=float(cluster.sequence_parallel))
        if loopback and cluster.media_host == "node":
            if address:  # replicas on other machines: viewers could never reach their loopback
                raise ValueError(f"RAY_ADDRESS={address} with --host {host}: viewers must reach every replica's "
                                 "node; give --host 0.0.0.0 (or the head's address), or --media-host ADDRESS")
            cluster = dataclasses.replace(cluster, media_host="127.0.0.1")
        port = port or _free_port(host)  # Serve's proxy needs the number before it listens
        announce(f"deploying {cluster.replicas} generation replica(s) of model {settings.model!r} on Ray "
                 f"({'cluster ' + address if address else 'a local instance'}) ...")
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(settings, cluster), name=APP_NAME, route_prefix="/")
        shown = f"[{host}]" if ":" in host else host
        announce(f"framepack-rt serve --cluster ray: open http://{shown}:{port}/ in a browser (Ctrl-C to stop)")
        _wait_for_signal()
        announce("stopping ...")
        _delete_app(serve)
    except KeyboardInterrupt:  # Ctrl-C while deploying
        announce("stopped before the application was up")
    finally:
        ray.shutdown()
    return 0


def _delete_app(serve: Any, timeout_s: float = 20.0) -> None:
    """Take the application down (replicas hang up on their viewers), waiting at most ``timeout_s``: a Ctrl-C
    in a terminal reaches a local instance's own processes too, and Serve then waits on them forever."""
    done = threading.Thread(target=serve.delete, args=(APP_NAME,), daemon=True)
    done.start()
    done.join(timeout_s)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
