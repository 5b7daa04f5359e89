"""`meshcni agent`: run the node agent in the foreground (the DaemonSet's main container, or a lab's agent).

Every path the agent touches is a flag, so a test or a lab runs its own agent beside a production one.
"""

from __future__ import annotations

import logging
import sys

import click

from meshcni.agent.proxies import DEFAULT_HANDOFF_DIR
from meshcni.agent.daemon import DEFAULT_METRICS, DEFAULT_SOCKET, DEFAULT_STATE_DIR, Agent, AgentOptions, AgentStartError
from meshcni.cni import protocol
from meshcni.sys.errors import SysError


@click.command("agent")
@click.option("--bpf-dir", "pin_dir", default="/sys/fs/bpf/meshcni", show_default=True,
              help="bpffs directory where programs, links and maps are pinned.")
@click.option("--cgroup", default=None, help="cgroup v2 directory the programs attach to [the hierarchy's root].")
@click.option("--state-dir", default=DEFAULT_STATE_DIR, show_default=True, help="Registry and lock file.")
@click.option("--socket", "socket_path", default=DEFAULT_SOCKET, show_default=True, help="gRPC API socket (0600).")
@click.option("--cni-socket", default=protocol.DEFAULT_SOCKET, show_default=True,
              help="The CNI plugin's HTTP socket (0600).")
@click.option("--pending-dir", default=protocol.DEFAULT_PENDING_DIR, show_default=True,
              help="ADDs the plugin recorded while the agent was down (failurePolicy open); replayed at start.")
@click.option("--metrics-address", default=DEFAULT_METRICS, show_default=True,
              help="host:port for /metrics and /healthz; '' disables.")
@click.option("--mode", "node_mode", type=click.Choice(["ebpf", "iptables", "off"]), default="ebpf",
              show_default=True, help="The node's default capture mode.")
@click.option("--policy-file", default=None, help="Off Kubernetes: JSON file of pod annotations (see meshcni/agent/policy.py).")
@click.option("--kube", is_flag=True, help="Read pod annotations from the Kubernetes API server (watch this node's pods).")
@click.option("--node-name", default=None, envvar="NODE_NAME", help="This node's name (with --kube).")
@click.option("--kubeconfig", default=None, envvar="KUBECONFIG", help="kubeconfig [in-cluster credentials].")
@click.option("--mask-feature", "masked", multiple=True,
              help="Treat a kernel feature as missing (testing the fallback). Repeatable.")
@click.option("--handoff-dir", default=DEFAULT_HANDOFF_DIR, show_default=True,
              help="Where per-pod handoff sockets of agent-held listeners are served (mount it into sidecars).")
@click.option("--hold-listeners/--no-hold-listeners", default=False, show_default=True,
              help="Node default for meshcni.io/listeners: the agent creates and holds every proxy's listeners.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True)
def agent(pin_dir, cgroup, state_dir, socket_path, cni_socket, pending_dir, metrics_address, node_mode,
          policy_file, kube, node_name, kubeconfig, masked, handoff_dir, hold_listeners, log_level):
    """Run the meshcni node agent in the foreground until SIGTERM."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = AgentOptions(pin_dir=pin_dir, cgroup=cgroup, state_dir=state_dir, socket=socket_path,
                        cni_socket=cni_socket, pending_dir=pending_dir, metrics_address=metrics_address,
                        node_mode=node_mode, policy_file=policy_file, kube=kube, node_name=node_name,
                        kubeconfig=kubeconfig, masked_features=tuple(masked), handoff_dir=handoff_dir,
                        hold_listeners=hold_listeners)
    daemon = Agent(opts)
    try:
        daemon.start()
    except (AgentStartError, SysError, OSError) as exc:
        daemon.stop()
        click.echo(f"meshcni agent: {exc}", err=True)
        sys.exit(1)
    daemon.run()
