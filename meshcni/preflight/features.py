"""The kernel and node features meshcni's capture depends on: stable ids, what each one is, how to fix it.

The ids are an interface: the agent reports them in `status` and metrics, operators mask them with
`--mask` / MESHCNI_MASK_FEATURES, and `plan` maps them to capture modes, so an id never changes meaning.
`needs` lists the features a probe cannot even be attempted without (no cgroup program can be attached
without cgroup v2); when one of those failed, the dependent feature is reported failed without probing.
Kernel versions in the remedies are the upstream ones in which the mechanism the datapath uses appeared.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Feature:
    id: str
    title: str
    remedy: str
    needs: tuple[str, ...] = ()


_ALL = (
    Feature("bpf_syscall", "bpf(2) creates maps",
            "run as root (CAP_BPF and CAP_SYS_ADMIN) on a kernel built with CONFIG_BPF_SYSCALL=y"),
    Feature("bpffs", "bpf filesystem accepts pins",
            "mount it: mount -t bpf bpf /sys/fs/bpf (a DaemonSet must mount the host's /sys/fs/bpf read-write)",
            ("bpf_syscall",)),
    Feature("cgroup_v2", "cgroup v2 hierarchy mounted and writable",
            "mount cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup/unified) or boot with "
            "systemd.unified_cgroup_hierarchy=1"),
    Feature("cgroup_sock_addr", "cgroup/connect4 and connect6 programs attach by bpf_link",
            "kernel >= 5.7 with CONFIG_CGROUP_BPF=y (connect hooks 4.17, cgroup bpf_link 5.7)",
            ("bpf_syscall", "cgroup_v2")),
    Feature("sockops", "sockops programs attach by bpf_link",
            "kernel >= 5.7 with CONFIG_CGROUP_BPF=y (sockops 4.13, cgroup bpf_link 5.7)",
            ("bpf_syscall", "cgroup_v2")),
    Feature("sk_msg_sockhash", "SOCKHASH map with an sk_msg program attached by bpf_link",
            "kernel >= 6.10 with CONFIG_BPF_STREAM_PARSER=y (SOCKHASH 4.18, sk_msg bpf_link 6.10)",
            ("bpf_syscall",)),
    Feature("sk_lookup", "sk_lookup program attaches to a network namespace",
            "kernel >= 5.9 with CONFIG_INET (BPF_PROG_TYPE_SK_LOOKUP); without it inbound uses iptables",
            ("bpf_syscall",)),
    Feature("netns_cookie", "netns cookies: SO_NETNS_COOKIE and bpf_get_netns_cookie in connect and sockops",
            "kernel >= 5.15 (helper in cgroup/connect 5.7, in sockops 5.15; SO_NETNS_COOKIE 5.14)",
            ("bpf_syscall",)),
    Feature("cgroup_getsockopt", "cgroup/getsockopt programs (SO_ORIGINAL_DST answers) attach by bpf_link",
            "kernel >= 5.8 with CONFIG_CGROUP_BPF=y (getsockopt hook 5.3, bpf_get_netns_cookie there 5.8)",
            ("bpf_syscall", "cgroup_v2")),
    Feature("btf", "kernel BTF at /sys/kernel/btf/vmlinux (informational: bcc does not need it)",
            "kernel built with CONFIG_DEBUG_INFO_BTF=y"),
    Feature("bcc", "bcc (python3-bpfcc) importable",
            "install Debian's python3-bpfcc and run from a venv made with --system-site-packages "
            "(scripts/setup.sh does both)"),
    Feature("kernel_headers", "kernel headers bcc compiles against",
            "run scripts/setup.sh to link headers (/lib/modules/$(uname -r)/build -> Debian's linux-headers-amd64)"),
    Feature("iptables", "iptables-restore programs nat REDIRECT rules in a network namespace",
            "install iptables (nft or legacy backend, set MESHCNI_IPTABLES_BACKEND if detection is wrong) on a "
            "kernel with NAT and REDIRECT (CONFIG_NF_NAT, nft_redir or xt_REDIRECT)"),
)

FEATURES: dict[str, Feature] = {f.id: f for f in _ALL}
FEATURE_IDS: tuple[str, ...] = tuple(FEATURES)
