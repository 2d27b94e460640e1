"""The cluster application's parts that need no Ray instance: settings, the builder's arguments, the sample
configs, the session table, metrics merging. (tests/stream/test_cluster.py deploys it on a local Ray.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.serve", reason="needs ray[serve]: pip install 'framepack-rt[cluster]'")
yaml = pytest.importorskip("yaml")

from framepack_rt.stream import cluster  # noqa: E402
from framepack_rt.stream.ingress import SessionTable, merge_metrics, relabel  # noqa: E402
from framepack_rt.stream.limits import PerClient  # noqa: E402
from framepack_rt.stream.server import ServerSettings  # noqa: E402

DEPLOY = Path(cluster.__file__).parent / "deploy"


def test_cluster_settings_check_their_bounds():
    with pytest.raises(ValueError, match="--replicas 0"):
        cluster.ClusterSettings(replicas=0)
    with pytest.raises(ValueError, match="min <= replicas <= max"):
        cluster.ClusterSettings(replicas=5, min_replicas=1, max_replicas=3)
    with pytest.raises(ValueError, match="--target-sessions"):
        cluster.ClusterSettings(target_sessions=0)


def test_fixed_and_autoscaled_deployments_take_sessions_as_their_load():
    settings = ServerSettings(model="tiny", max_sessions=3)
    fixed = cluster.ClusterSettings(replicas=2, gpus_per_replica=1).deployment_options(settings)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"]["num_gpus"] == 1
    assert fixed["max_ongoing_requests"] == 3 + cluster.API_HEADROOM  # sessions, plus room for API requests
    scaled = cluster.ClusterSettings(replicas=2, min_replicas=1, max_replicas=6).deployment_options(settings)
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 2, "max_replicas": 6,
                                            "target_ongoing_requests": 3}
    assert "num_replicas" not in scaled


def test_builder_takes_command_line_text_and_refuses_unknown_keys(monkeypatch):
    monkeypatch.setenv("FRAMEPACK_RT_TOKEN", "a-token-from-the-env")
    app = cluster.build_app({"model": "tiny", "replicas": "2", "max_sessions": "3", "grace": "1.5",
                             "min_replicas": "1", "max_replicas": "4", "stamp": "true"})
    from ray.serve import Application

    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="unknown argument"):
        cluster.build_app({"model": "tiny", "replica": 2})
    assert cluster._typed(ServerSettings, "grace", "1.5") == 1.5
    assert cluster._typed(ServerSettings, "stamp", "yes") is True
    assert cluster._typed(cluster.ClusterSettings, "min_replicas", "3") == 3


@pytest.mark.parametrize("name", ["serve_config.yaml", "rayservice.yaml"])
def test_sample_configs_are_valid_serve_configs_for_the_builder(name, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    document = yaml.safe_load((DEPLOY / name).read_text())
    if document.get("kind") == "RayService":
        document = yaml.safe_load(document["spec"]["serveConfigV2"])
    app = ServeDeploySchema.model_validate(document).applications[0]
    assert app.import_path == "framepack_rt.stream.cluster:build_app"
    assert set(app.args) <= cluster.CLUSTER_FIELDS | cluster.SERVER_FIELDS
    monkeypatch.setenv("FRAMEPACK_RT_TURN_USERNAME", "u")
    monkeypatch.setenv("FRAMEPACK_RT_TURN_CREDENTIAL", "p")
    cluster.build_app(app.args)  # every value converts and validates


def test_session_table_remembers_why_sessions_ended():
    async def scenario() -> None:
        table = SessionTable()
        places = PerClient(2, "sessions")
        a = table.add("a", {"id": "r1"}, release=places.take("10.0.0.1"))
        table.add("b", {"id": "r2"}, release=places.take("10.0.0.1"))
        assert places.held["10.0.0.1"] == 2 and set(table.by_replica()) == {"r1", "r2"}
        table.end(a, "the replica stopped", lost=True)
        assert a.state == "lost" and table.get("a") is a and "a" not in table.live
        assert table.lost_total == 1 and places.held["10.0.0.1"] == 1  # the ended one's place is free

    asyncio.run(scenario())


def test_metrics_of_replicas_merge_with_their_replica_label():
    one = '# HELP x_total X\n# TYPE x_total counter\nx_total 1\ny{kind="a b"} 2\n'
    merged = merge_metrics([relabel(one, "r1"), relabel(one, "r2")])
    assert merged.count("# HELP x_total X") == 1
    assert 'x_total{replica="r1"} 1' in merged and 'x_total{replica="r2"} 1' in merged
    assert 'y{replica="r2",kind="a b"} 2' in merged


def test_router_keeps_sessions_on_their_replica_and_offers_full_replicas_last():
    from types import SimpleNamespace

    from framepack_rt.stream.cluster_router import SessionRouter

    a, b, c = (SimpleNamespace(replica_id=SimpleNamespace(unique_id=name)) for name in "abc")

    def choose(**kwargs):
        return asyncio.run(SessionRouter.choose_replicas(None, [a, b, c], SimpleNamespace(kwargs=kwargs)))

    assert choose(replica="b") == [[b]]  # a session's requests: its holder only
    assert choose(replica="gone") == [[a, b, c]]  # holder gone: any replica answers "no such session"
    assert choose() == [[a, b, c]]  # a new session: the base class takes the shortest queue with room
    assert choose(avoid=("a",)) == [[b, c], [a]]  # a replica that answered "full" goes last


class FakeReplicas:
    """The generation handle as the ingress uses it: each open_session call answers from ``answers`` (a status,
    or an exception: the replica died), and records the ``avoid`` it was given."""

    def __init__(self, answers: list, delay: float = 0.0) -> None:
        self.answers, self.avoided, self.delay = list(answers), [], delay

    def options(self, stream: bool) -> "FakeReplicas":
        return self

    @property
    def open_session(self) -> "FakeReplicas":
        return self

    def remote(self, forwarded: Any, avoid: tuple[str, ...] = ()) -> Any:
        from framepack_rt.stream.replica import ForwardedResponse

        self.avoided.append(avoid)
        answer, replica = self.answers.pop(0)

        async def stream():
            await asyncio.sleep(self.delay)
            if isinstance(answer, Exception):
                raise answer
            yield {"response": ForwardedResponse(answer, {}, b"{}"), "replica": {"id": replica, "node": "n"},
                   "session": None}

        return stream()


def test_ingress_offers_a_refused_or_failed_offer_to_another_replica():
    from framepack_rt.stream.ingress import ClusterIngress, ReplicaUnavailable
    from framepack_rt.stream.replica import ForwardedRequest

    offer = ForwardedRequest("POST", "/offer", {}, b"{}", "10.0.0.1")

    def open_with(answers):
        replicas = FakeReplicas(answers)
        ingress = ClusterIngress(replicas, ServerSettings(model="tiny"))
        _, first = asyncio.run(ingress._open(offer))
        return first["response"].status, replicas.avoided

    assert open_with([(429, "a"), (200, "b")]) == (200, [(), ("a",)])  # full: tried elsewhere
    assert open_with([(RuntimeError("died"), "a"), (200, "b")]) == (200, [(), ()])  # died before answering
    assert open_with([(429, "a"), (429, "b"), (429, "c")])[0] == 429  # every replica full: the 429 stands
    with pytest.raises(ReplicaUnavailable, match="try again"):
        open_with([(RuntimeError("died"), "a")] * 3)


def http_request(path: str, query: str = "", headers: dict[str, str] | None = None, peer: str = "10.0.0.9"):
    from starlette.requests import Request

    async def receive() -> dict:  # an empty body
        return {"type": "http.request", "body": b"", "more_body": False}

    return Request({"type": "http", "method": "GET", "path": path, "query_string": query.encode(),
                    "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
                    "client": (peer, 40000)}, receive)


def test_end_needs_the_token_or_the_sessions_key_when_a_token_is_set():
    from framepack_rt.stream.ingress import ClusterIngress

    async def scenario() -> list[int]:
        ingress = ClusterIngress(FakeReplicas([]), ServerSettings(model="tiny", token="a-cluster-token"))
        held = ingress.table.add("s1", {"id": "r1", "node": "n"}, ("view-key", "control-key"))
        ingress.table.end(held, "closed", lost=False)
        asks = [("s1", ""), ("s1", "key=view-key"), ("s1", "key=control-key"), ("s1", "key=wrong"),
                ("nope", ""), ("s1", "", "a-cluster-token"), ("nope", "", "a-cluster-token")]
        codes = []
        for session, query, *token in asks:
            headers = {"Authorization": f"Bearer {token[0]}"} if token else {}
            answer = await ingress._wait_end(http_request(f"/api/sessions/{session}/end", query, headers), session)
            codes.append(answer.status_code)
        return codes

    assert asyncio.run(scenario()) == [401, 200, 200, 401, 401, 200, 404]


def test_the_client_is_the_peer_or_what_a_trusted_proxy_forwards():
    from framepack_rt.stream.ingress import ClusterIngress

    ingress = ClusterIngress(FakeReplicas([]), ServerSettings(model="tiny", trusted_proxies=("10.0.0.1",)))
    forwarded = {"X-Forwarded-For": "1.2.3.4, 5.6.7.8"}
    assert ingress.client_address(http_request("/", headers=forwarded, peer="10.0.0.1")) == "5.6.7.8"
    assert ingress.client_address(http_request("/", headers=forwarded, peer="10.0.0.2")) == "10.0.0.2"


def test_offers_in_flight_count_against_the_clients_sessions():
    from framepack_rt.stream.ingress import ClusterIngress
    from framepack_rt.stream.replica import ForwardedRequest

    async def scenario() -> list[int]:
        replicas = FakeReplicas([(200, "a"), (200, "b")], delay=0.2)
        ingress = ClusterIngress(replicas, ServerSettings(model="tiny", max_sessions_per_client=1))
        offer = ForwardedRequest("POST", "/offer", {}, b"{}", "10.0.0.1")
        answers = await asyncio.gather(ingress._offer(offer), ingress._offer(offer))
        return sorted(a.status_code for a in answers)

    assert asyncio.run(scenario()) == [200, 429]


def test_builder_keeps_text_fields_as_text():
    from ray.serve import Application

    app_args = {"model": "tiny", "token": "12345678", "udp_ports": "40000-40100"}
    assert isinstance(cluster.build_app(app_args), Application)  # a digits-only token passes check_token
    assert cluster._typed(ServerSettings, "token", "12345678") == "12345678"
    assert cluster._typed(ServerSettings, "cfg", "none") is None


def test_a_download_passes_through_the_ingress_chunk_by_chunk():
    from framepack_rt.stream.ingress import ClusterIngress
    from framepack_rt.stream.replica import ForwardedResponse

    chunks = [b"a" * 10, b"b" * 7]

    class Streaming:
        def options(self, stream: bool) -> "Streaming":
            return self

        @property
        def forward_stream(self) -> "Streaming":
            return self

        def remote(self, forwarded: Any, replica: str | None = None) -> Any:
            async def stream():
                yield ForwardedResponse(200, {"Content-Type": "video/mp4", "Content-Length": "17"}, b"")
                for chunk in chunks:
                    yield chunk

            self.asked = replica
            return stream()

    async def scenario() -> tuple[int, bytes, str]:
        replicas = Streaming()
        ingress = ClusterIngress(replicas, ServerSettings(model="tiny"))
        ingress.table.add("s1", {"id": "r1", "node": "n"})
        response = await ingress._route(http_request("/api/sessions/s1/video.mp4", "key=k"))
        body = b"".join([part async for part in response.body_iterator])
        return response.status_code, body, replicas.asked

    assert asyncio.run(scenario()) == (200, b"a" * 10 + b"b" * 7, "r1")
