"""Prometheus metrics: per-pod capture counters read at scrape time, plus agent health.

The counters are read where they live when Prometheus scrapes rather than copied into client-side
counters, so nothing drifts: the per-CPU counters in `mcni_counters_v1` for eBPF (the totals carry on across
an agent restart because the pinned map does), the nat rules' packet counts for iptables (one subprocess
per IP family per pod; they start from zero each time a pod enters iptables mode, which Prometheus reads as
a counter reset). Names follow Prometheus conventions (`meshcni_` prefix, `_total` for counters, base
units); labels are pod, namespace, direction and mode.

The HTTP server answers `/metrics` and `/healthz` (200 once the datapath is loaded or the node runs
without eBPF, 503 otherwise — the DaemonSet's readiness probe).
"""

from __future__ import annotations

import logging
import platform
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.process_collector import ProcessCollector

from meshcni import __version__
from meshcni.agent.core import AgentCore

log = logging.getLogger("meshcni.agent")

# datapath counter -> (metric, help, direction); the direction label separates what one metric counts
_DATAPATH = {
    "outbound_captured": ("meshcni_connections_captured_total", "Connections redirected to the sidecar proxy.",
                          "outbound"),
    "inbound_steered": ("meshcni_connections_captured_total", None, "inbound"),
    "bypassed": ("meshcni_connections_bypassed_total",
                 "Connections of enrolled pods left alone (proxy's own, excluded port or CIDR).", "outbound"),
    "msgs_spliced": ("meshcni_spliced_messages_total", "Messages passed socket to socket by sk_msg.", ""),
    "bytes_spliced": ("meshcni_spliced_bytes_total", "Bytes passed socket to socket by sk_msg.", ""),
    "no_listener": ("meshcni_inbound_no_listener_total",
                    "Inbound connections that found no proxy listener and went to the app directly.", "inbound"),
    "errors": ("meshcni_datapath_errors_total", "Datapath operations that failed (map full, redirect error).", ""),
}


class AgentCollector:
    def __init__(self, core: AgentCore, status: Callable[[], dict], extra: Callable[[], dict] | None = None):
        self.core = core
        self.status = status
        self.extra = extra  # name -> (help, value) counters from other parts (handoff, upgrades)

    def collect(self):
        info = InfoMetricFamily("meshcni_agent_build", "The running agent's version.")
        info.add_metric([], {"version": __version__, "python": platform.python_version(),
                             "kernel": platform.release()})
        yield info

        status = self.status()
        up = GaugeMetricFamily("meshcni_datapath_loaded", "1 when the eBPF datapath is loaded and attached.")
        up.add_metric([], 1.0 if status["datapath_loaded"] else 0.0)
        yield up
        degraded = GaugeMetricFamily("meshcni_feature_degraded",
                                     "1 for each kernel feature the node falls back from (see meshcni doctor).",
                                     labels=["feature"])
        for feature in status["degraded"]:
            degraded.add_metric([feature], 1.0)
        yield degraded

        pods = GaugeMetricFamily("meshcni_pods", "Enrolled pods by capture mode.", labels=["mode"])
        for mode, count in sorted(status["pods_by_mode"].items()):
            pods.add_metric([mode], float(count))
        yield pods

        errors = CounterMetricFamily("meshcni_enrol_errors", "Pod enrolments the agent refused or failed.",
                                     labels=["reason"])
        for reason, count in sorted(self.core.enrol_errors.items()):
            errors.add_metric([reason], float(count))
        yield errors

        families: dict[str, CounterMetricFamily] = {}
        helps = {metric: text for metric, text, _ in _DATAPATH.values() if text}
        for record in self.core.registry.all():
            try:
                counters = self.core.counters(record)
            except Exception as exc:  # noqa: BLE001 - one unreadable pod must not fail the whole scrape
                log.warning("metrics: counters of %s: %s", record.display_name, exc)
                continue
            for name, value in counters.items():
                metric, _help, direction = _DATAPATH[name]
                fam = families.get(metric)
                if fam is None:
                    fam = families[metric] = CounterMetricFamily(
                        metric[: -len("_total")], helps[metric], labels=["pod", "namespace", "direction", "mode"])
                fam.add_metric([record.pod_name or record.container_id, record.pod_namespace, direction,
                                record.mode], float(value))
        yield from families.values()

        yield from self._proxies()

        for name, (text, value) in sorted((self.extra() if self.extra else {}).items()):
            fam = CounterMetricFamily(name, text)
            fam.add_metric([], float(value))
            yield fam


    def _proxies(self):
        """Hot-upgrade figures of pods whose listeners the agent holds (and adoptions of the others)."""
        proxies = self.core.proxies
        if proxies is None:
            return
        labels = ["pod", "namespace"]
        upgrades = CounterMetricFamily("meshcni_proxy_upgrades", "Proxy replacements the agent drove, by flow "
                                       "(graceful, crash, adopt) and result.", labels=labels + ["kind", "result"])
        handoffs = CounterMetricFamily("meshcni_proxy_handoffs", "Listener sets handed to a proxy over the pod's "
                                       "handoff socket.", labels=labels)
        refused = CounterMetricFamily("meshcni_proxy_handoffs_refused", "Handoff requests refused (wrong uid or "
                                      "network namespace).", labels=labels)
        queued = CounterMetricFamily("meshcni_proxy_connections_queued", "Connections that waited in a held "
                                     "listener while no proxy generation accepted (crash or handoff).",
                                     labels=labels)
        lost = CounterMetricFamily("meshcni_proxy_inflight_lost", "Connections a SIGKILLed proxy had accepted "
                                   "(crash flow): no listener can save those.", labels=labels)
        backlog = GaugeMetricFamily("meshcni_proxy_listener_queue", "Connections waiting in a held listener's "
                                    "accept queue now.", labels=labels + ["listener"])
        held = GaugeMetricFamily("meshcni_proxy_listeners_held", "Listening sockets the agent holds for the pod.",
                                 labels=labels)
        for entry in proxies.all():
            ids = self._pod_labels(entry.container_id)
            try:
                counts = entry.server.counters()
                waiting = entry.listeners.queued()
            except Exception as exc:  # noqa: BLE001 - a pod released during the scrape
                log.debug("metrics: proxy of %s: %s", entry.display, exc)
                continue
            handoffs.add_metric(ids, float(counts["handoffs"]))
            refused.add_metric(ids, float(counts["refused"]))
            held.add_metric(ids, float(len(waiting)))
            for name, n in waiting.items():
                backlog.add_metric(ids + [name], float(n))
            stats = entry.stats.to_dict()
            self._add_upgrades(upgrades, ids, stats)
            queued.add_metric(ids, float(stats["queued_connections"]))
            lost.add_metric(ids, float(stats["in_flight_lost"]))
        for container_id, stats in list(proxies.adopt_stats.items()):
            self._add_upgrades(upgrades, self._pod_labels(container_id), stats.to_dict(), only=("adopt",))
        yield from (upgrades, handoffs, refused, queued, lost, backlog, held)

    def _pod_labels(self, container_id: str) -> list[str]:
        record = self.core.registry.get(container_id)
        if record is None:
            return [container_id, ""]
        return [record.pod_name or record.container_id, record.pod_namespace]

    @staticmethod
    def _add_upgrades(fam, ids: list[str], stats: dict, only=("graceful", "crash")) -> None:
        for kind, key in (("graceful", "graceful"), ("crash", "crash_restarts"), ("adopt", "adoptions")):
            if kind in only:
                fam.add_metric(ids + [kind, "ok"], float(stats[key]))
        fam.add_metric(ids + [only[0] if len(only) == 1 else "any", "failed"], float(stats["failed"]))


class MetricsServer:
    """`/metrics` and `/healthz` on a TCP address (default 127.0.0.1:9464)."""

    def __init__(self, collector: AgentCollector, address: str, healthy: Callable[[], bool]):
        host, _, port = address.rpartition(":")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.registry.register(ProcessCollector(registry=None))
        self.healthy = healthy
        registry, is_healthy = self.registry, healthy

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):
                log.debug("metrics http: " + fmt, *args)

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    status, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest(registry)
                elif path == "/healthz":
                    ok = is_healthy()
                    status, ctype, body = (200 if ok else 503), "text/plain", b"ok\n" if ok else b"not ready\n"
                else:
                    status, ctype, body = 404, "text/plain", b"not found: try /metrics or /healthz\n"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer((host.strip("[]") or "0.0.0.0", int(port)), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
