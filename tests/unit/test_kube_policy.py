"""KubePolicySource against tests/fake_kube_api.py over real HTTP: list, watch, 410 re-list, reconnects, GET, close.

The source is built from a kubeconfig file written by the fake (so credential loading is exercised too).
Nothing here asserts on durations: every wait is for a state (a callback recorded, a watch re-opened, a
resourceVersion reached) with a generous timeout, and the assertions are on the states reached.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from meshcni.agent import kube
from meshcni.agent.kube import KubePolicySource, KubeSourceError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_kube_api import FakeKubeApi  # noqa: E402

NODE = "node-a"
OTHER = "node-b"
WAIT = 15.0
EXCLUDE = "traffic.sidecar.istio.io/excludeOutboundPorts"
MODE = "meshcni.io/mode"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


class Recorder:
    """Collects on_change calls and lets a test wait for the n-th one."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self._cond = threading.Condition()

    def __call__(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        with self._cond:
            self.calls.append((namespace, name, annotations))
            self._cond.notify_all()

    def wait_for(self, count: int) -> list[tuple[str, str, dict[str, str]]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.calls) >= count, WAIT), f"calls so far: {self.calls}"
            return list(self.calls)


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def api():
    with FakeKubeApi() as server:
        yield server


@pytest.fixture
def kubeconfig(api: FakeKubeApi, tmp_path: Path) -> Path:
    return api.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def make_source(kubeconfig: Path):
    made: list[KubePolicySource] = []

    def make(**kwargs) -> KubePolicySource:
        source = KubePolicySource(NODE, kubeconfig=str(kubeconfig), **kwargs)
        made.append(source)
        source.start()
        return source

    yield make
    for source in made:
        source.close()


def test_list_keeps_only_this_nodes_pods_and_only_mesh_annotations(api, make_source):
    api.add_pod("default", "a1", NODE, {MODE: "iptables", LAST_APPLIED: "{...big...}"}, ip="10.0.0.2")
    api.add_pod("shop", "a2", NODE, {}, ip="10.0.0.3")
    api.add_pod("default", "b1", OTHER, {MODE: "off"}, ip="10.0.1.2")
    api.add_pod("default", "pending", None, {MODE: "off"})

    source = make_source()

    assert source.pods() == {("default", "a1"): {MODE: "iptables"}, ("shop", "a2"): {}}
    assert api.requests[0][2]["fieldSelector"] == f"spec.nodeName={NODE}"
    assert source.status().relists == 1


def test_all_annotations_kept_when_prefixes_is_none(api, make_source):
    api.add_pod("default", "a1", NODE, {MODE: "iptables", LAST_APPLIED: "{}"})
    source = make_source(annotation_prefixes=None)
    assert source.annotations("default", "a1") == {MODE: "iptables", LAST_APPLIED: "{}"}


def test_list_follows_continue_tokens(api, make_source, monkeypatch):
    monkeypatch.setattr(kube, "LIST_PAGE_SIZE", 2)
    for i in range(5):
        api.add_pod("default", f"p{i}", NODE, {MODE: "ebpf"})
    source = make_source()
    assert sorted(source.pods()) == [("default", f"p{i}") for i in range(5)]
    lists = [q for m, p, q in api.requests if p == "/api/v1/pods" and "watch" not in q]
    assert [q.get("limit") for q in lists] == ["2", "2", "2"]
    assert "continue" not in lists[0] and all("continue" in q for q in lists[1:])


def test_modified_updates_cache_and_fires_on_change_only_for_kept_annotations(api, make_source):
    api.add_pod("default", "a1", NODE, {MODE: "ebpf"})
    recorder = Recorder()
    source = make_source(on_change=recorder)
    assert api.wait_for_watchers(1, timeout=WAIT)

    api.set_annotations("default", "a1", {MODE: "ebpf", LAST_APPLIED: "v2"})  # nothing we keep changed
    api.set_annotations("default", "a1", {MODE: "iptables", EXCLUDE: "5432"})

    calls = recorder.wait_for(1)
    # Events arrive in order, so had the first edit fired, it would be calls[0].
    assert calls == [("default", "a1", {MODE: "iptables", EXCLUDE: "5432"})]
    assert source.cached("default", "a1") == {MODE: "iptables", EXCLUDE: "5432"}
    assert source.status().resource_version == str(api.resource_version)


def test_deleted_removes_and_fires_empty(api, make_source):
    api.add_pod("default", "a1", NODE, {MODE: "ebpf"})
    api.add_pod("default", "a2", NODE, {MODE: "ebpf"})
    recorder = Recorder()
    source = make_source(on_change=recorder)
    assert api.wait_for_watchers(1, timeout=WAIT)

    api.delete_pod("default", "a1")

    assert recorder.wait_for(1) == [("default", "a1", {})]
    assert source.cached("default", "a1") is None
    assert source.pods() == {("default", "a2"): {MODE: "ebpf"}}


def test_added_and_bound_pods_join_the_cache_without_a_callback(api, make_source):
    recorder = Recorder()
    source = make_source(on_change=recorder)
    assert api.wait_for_watchers(1, timeout=WAIT)

    api.add_pod("default", "late", NODE, {MODE: "iptables"})
    api.add_pod("default", "pending", None, {MODE: "off"})
    api.add_pod("default", "elsewhere", OTHER, {MODE: "off"})
    api.bind("default", "pending", NODE)  # enters the field selection: the watch says ADDED
    api.set_annotations("default", "late", {MODE: "ebpf"})  # a change we can wait for, after the others

    assert recorder.wait_for(1) == [("default", "late", {MODE: "ebpf"})]
    assert source.pods() == {("default", "late"): {MODE: "ebpf"}, ("default", "pending"): {MODE: "off"}}


def test_gone_while_disconnected_relists_and_reports_the_difference(api, make_source):
    api.add_pod("default", "stays", NODE, {MODE: "ebpf"})
    api.add_pod("default", "edited", NODE, {MODE: "ebpf"})
    api.add_pod("default", "deleted", NODE, {MODE: "ebpf"})
    recorder = Recorder()
    source = make_source(on_change=recorder)
    assert api.wait_for_watchers(1, timeout=WAIT)

    # Take the watch down and keep it down while the world changes and history is compacted away.
    api.refuse_watches()
    api.drop_watches()
    assert api.wait_for_watchers(0, timeout=WAIT)
    api.set_annotations("default", "edited", {MODE: "iptables"})
    api.delete_pod("default", "deleted")
    api.add_pod("default", "new", NODE, {MODE: "off"})
    api.compact()
    refused_before = api.watch_requests
    api.refuse_watches(False)

    calls = recorder.wait_for(2)
    assert sorted(calls) == [("default", "deleted", {}), ("default", "edited", {MODE: "iptables"})]
    assert source.pods() == {("default", "stays"): {MODE: "ebpf"}, ("default", "edited"): {MODE: "iptables"},
                             ("default", "new"): {MODE: "off"}}
    status = source.status()
    assert status.relists == 2
    assert status.errors >= 1  # the drop, and every refused watch
    assert api.watch_requests > refused_before
    # Watching again from the re-list's resourceVersion: later changes still arrive.
    assert api.wait_for_watchers(1, timeout=WAIT)
    api.set_annotations("default", "stays", {MODE: "off"})
    assert recorder.wait_for(3)[2] == ("default", "stays", {MODE: "off"})


def test_410_error_event_on_an_open_watch_relists(api, make_source):
    api.add_pod("default", "a1", NODE, {MODE: "ebpf"})
    recorder = Recorder()
    source = make_source(on_change=recorder)
    assert api.wait_for_watchers(1, timeout=WAIT)

    api.expire_watches()

    wait_until(lambda: source.status().relists == 2, "the re-list after 410")
    assert api.wait_for_watchers(1, opened_at_least=2, timeout=WAIT)
    api.set_annotations("default", "a1", {MODE: "iptables"})
    assert recorder.wait_for(1) == [("default", "a1", {MODE: "iptables"})]
    assert source.status().errors == 0  # 410 is routine, not an error


def test_dropped_watch_reconnects_from_its_resource_version(api, make_source):
    api.add_pod("default", "a1", NODE, {MODE: "ebpf"})
    recorder = Recorder()
    source = make_source(on_change=recorder)
    assert api.wait_for_watchers(1, timeout=WAIT)

    api.drop_watches()
    assert api.wait_for_watchers(1, opened_at_least=2, timeout=WAIT)
    api.set_annotations("default", "a1", {MODE: "off"})

    assert recorder.wait_for(1) == [("default", "a1", {MODE: "off"})]
    status = source.status()
    assert status.relists == 1  # reconnected from its resourceVersion, no re-list needed
    assert status.errors == 1 and "dropped" in status.last_error
    watch_rvs = [q["resourceVersion"] for m, p, q in api.requests if q.get("watch") == "true"]
    assert watch_rvs[0] == watch_rvs[1]  # nothing happened in between


def test_silent_watch_is_reopened_without_an_error(api, make_source, monkeypatch):
    monkeypatch.setattr(kube, "WATCH_READ_TIMEOUT", 0.3)
    api.add_pod("default", "a1", NODE, {MODE: "ebpf"})
    recorder = Recorder()
    source = make_source(on_change=recorder)

    assert api.wait_for_watchers(1, opened_at_least=3, timeout=WAIT)  # nothing to say: read timeouts
    api.set_annotations("default", "a1", {MODE: "off"})

    assert recorder.wait_for(1) == [("default", "a1", {MODE: "off"})]
    status = source.status()
    assert status.errors == 0 and status.relists == 1


def test_bookmark_advances_resource_version_so_compaction_needs_no_relist(api, make_source):
    api.add_pod("default", "a1", NODE, {MODE: "ebpf"})
    api.add_pod("default", "x", OTHER, {})
    source = make_source()
    assert api.wait_for_watchers(1, timeout=WAIT)
    api.set_annotations("default", "x", {MODE: "off"})  # not our node: only a bookmark tells us of it

    api.send_bookmark()
    wait_until(lambda: source.status().resource_version == str(api.resource_version), "the bookmark")
    api.compact()
    api.drop_watches()
    assert api.wait_for_watchers(1, opened_at_least=2, timeout=WAIT)
    assert source.status().relists == 1


def test_get_on_cache_miss_is_not_cached_and_hit_makes_no_request(api, make_source):
    api.add_pod("default", "mine", NODE, {MODE: "ebpf"})
    source = make_source()
    api.add_pod("default", "raced", OTHER, {EXCLUDE: "9000", LAST_APPLIED: "{}"})

    assert source.annotations("default", "raced") == {EXCLUDE: "9000"}
    assert api.count("GET", "/api/v1/namespaces/default/pods/raced") == 1
    assert source.cached("default", "raced") is None

    assert source.annotations("default", "mine") == {MODE: "ebpf"}
    assert api.count("GET", "/api/v1/namespaces/default/pods/mine") == 0


def test_unknown_pod_is_none(api, make_source):
    source = make_source()
    assert source.annotations("default", "nope") is None
    assert api.count("GET", "/api/v1/namespaces/default/pods/nope") == 1


def test_returned_annotations_are_copies(api, make_source):
    api.add_pod("default", "a1", NODE, {MODE: "ebpf"})
    source = make_source()
    source.annotations("default", "a1")[MODE] = "off"
    source.pods()[("default", "a1")][MODE] = "off"
    assert source.cached("default", "a1") == {MODE: "ebpf"}


def test_raising_callback_does_not_stop_the_watch(api, make_source):
    api.add_pod("default", "a1", NODE, {MODE: "ebpf"})
    recorder = Recorder()

    def callback(namespace, name, annotations):
        recorder(namespace, name, annotations)
        if len(recorder.calls) == 1:
            raise RuntimeError("callback bug")

    source = make_source(on_change=callback)
    assert api.wait_for_watchers(1, timeout=WAIT)
    api.set_annotations("default", "a1", {MODE: "iptables"})
    api.set_annotations("default", "a1", {MODE: "off"})
    assert [c[2] for c in recorder.wait_for(2)] == [{MODE: "iptables"}, {MODE: "off"}]
    assert source.thread.is_alive()


def test_close_stops_the_watch_thread_and_its_connection(api, kubeconfig):
    api.add_pod("default", "a1", NODE, {MODE: "ebpf"})
    source = KubePolicySource(NODE, kubeconfig=str(kubeconfig))
    source.start()
    try:
        assert api.wait_for_watchers(1, timeout=WAIT)
        assert source.thread.is_alive()
    finally:
        source.close()
    assert not source.thread.is_alive()
    assert api.wait_for_watchers(0, timeout=WAIT)
    assert api.watch_requests == 1


def test_close_while_backing_off_stops_the_thread(api, kubeconfig):
    source = KubePolicySource(NODE, kubeconfig=str(kubeconfig))
    source.start()
    try:
        assert api.wait_for_watchers(1, timeout=WAIT)
        api.refuse_watches()
        api.drop_watches()
        wait_until(lambda: source.status().errors >= 2, "a refused watch")
    finally:
        source.close()
    assert not source.thread.is_alive()


def test_wrong_token_is_a_clear_error(api, tmp_path):
    config = api.write_kubeconfig(tmp_path / "kubeconfig", token="wrong")
    source = KubePolicySource(NODE, kubeconfig=str(config))
    try:
        with pytest.raises(KubeSourceError, match=r"list pods on node node-a: HTTP 401 .*ServiceAccount"):
            source.start()
        assert source.thread is None
    finally:
        source.close()


def test_unreachable_server_is_a_clear_error(api, tmp_path):
    config = api.write_kubeconfig(tmp_path / "kubeconfig")
    api.stop()
    source = KubePolicySource(NODE, kubeconfig=str(config))
    try:
        with pytest.raises(KubeSourceError, match="list pods on node node-a"):
            source.start()
    finally:
        source.close()


def test_missing_kubeconfig_and_empty_node_are_clear_errors(tmp_path):
    with pytest.raises(KubeSourceError, match="cannot load Kubernetes credentials from .*missing"):
        KubePolicySource(NODE, kubeconfig=str(tmp_path / "missing"))
    with pytest.raises(KubeSourceError, match="node name is empty"):
        KubePolicySource("", kubeconfig=str(tmp_path / "missing"))
