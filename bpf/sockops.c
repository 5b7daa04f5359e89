/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * sockops: index captured connections by 4-tuple and collect spliceable sockets.
 *
 * When a captured app socket becomes established, its original destination moves from the socket-cookie
 * map to a map keyed by the app-side tuple, which is what the proxy side can compute in getsockopt. Sockets
 * whose peer is in the same pod (loopback) go into mcni_socks_v1 so that sk_msg can hand data straight to
 * the peer socket, subject to the pod's flags: by default (MCNI_F_SPLICE) only the sidecar proxy's own ends of
 * proxy <-> proxy connections, because inserting a socket swaps its recvmsg for tcp_bpf_recvmsg, which a
 * blocking application may not survive (see "Splicing" in docs/architecture.md); the app's sockets too only
 * with MCNI_F_SPLICE_APP. The proxy's outgoing sockets are recognised here at TCP_CONNECT_CB, its accepted
 * ones by sk_lookup; both are recorded in mcni_proxy_ends_v1 until ESTABLISHED.
 */
#include "meshcni.h"

static __always_inline void mcni_sockops_tuple(struct bpf_sock_ops *skops, struct mcni_tuple *t, __u64 netns)
{
	if (skops->family == AF_INET) {
		mcni_ip_from_v4(&t->local, MCNI_CTX_U32(skops, local_ip4));
		mcni_ip_from_v4(&t->remote, MCNI_CTX_U32(skops, remote_ip4));
	} else {
		__u32 l[4] = { MCNI_CTX_U32(skops, local_ip6[0]), MCNI_CTX_U32(skops, local_ip6[1]), MCNI_CTX_U32(skops, local_ip6[2]), MCNI_CTX_U32(skops, local_ip6[3]) };
		__u32 r[4] = { MCNI_CTX_U32(skops, remote_ip6[0]), MCNI_CTX_U32(skops, remote_ip6[1]), MCNI_CTX_U32(skops, remote_ip6[2]), MCNI_CTX_U32(skops, remote_ip6[3]) };
		mcni_ip_from_v6(&t->local, l);
		mcni_ip_from_v6(&t->remote, r);
	}
	t->local_port = (__u16)MCNI_CTX_U32(skops, local_port);          /* host byte order */
	t->remote_port = (__u16)bpf_ntohl(MCNI_CTX_U32(skops, remote_port)); /* network order, shifted into the high half */
	t->_pad = 0;
	mcni_tuple_scope(t, netns);
}

static __always_inline void mcni_established(struct bpf_sock_ops *skops, const struct mcni_pod *pod, __u64 netns)
{
	struct mcni_tuple t = {};
	mcni_sockops_tuple(skops, &t, netns);

	__u64 cookie = bpf_get_socket_cookie(skops);
	struct mcni_origdst *orig = mcni_sock_origdst_v1.lookup(&cookie);
	if (orig) {
		struct mcni_origdst copy = *orig;
		mcni_pair_origdst_v1.update(&t, &copy);
		mcni_sock_origdst_v1.delete(&cookie);
		/* ask for the state callback so the pair entry goes away with the connection */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	}

	/* whatever happens below, the record of a proxy end is consumed here */
	int proxy_end = 0;
	if (!t.netns && mcni_proxy_ends_v1.lookup(&t)) {
		proxy_end = 1;
		mcni_proxy_ends_v1.delete(&t);
	}
	if (!(pod->flags & MCNI_F_SPLICE) || !mcni_splice_candidate(&t))
		return;
	if (!proxy_end && !(pod->flags & MCNI_F_SPLICE_APP))
		return; /* an app's socket (or the proxy's end facing its app): not without the pod's opt-in */
	/* (bcc rewrites map methods only as whole statements, hence the temporary) */
	long rc = mcni_socks_v1.sock_hash_update(skops, &t, BPF_ANY);
	if (rc != 0)
		mcni_count(pod->slot, MCNI_CTR_ERRORS, 1);
	else
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

int mcni_sockops(struct bpf_sock_ops *skops)
{
	if (skops->family != AF_INET && skops->family != AF_INET6)
		return 1;
	__u64 netns = bpf_get_netns_cookie(skops);
	struct mcni_pod *pod = mcni_pod_by_netns(netns);
	if (!pod)
		return 1;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* called from connect() itself, so the current task is the one that owns the socket */
		if (pod->flags & MCNI_F_SPLICE) {
			__u64 uid_gid = bpf_get_current_uid_gid();
			if ((__u32)uid_gid == pod->proxy_uid || (__u32)(uid_gid >> 32) == pod->proxy_gid) {
				struct mcni_tuple t = {};
				mcni_sockops_tuple(skops, &t, netns);
				if (mcni_proxy_pair_candidate(&t))
					mcni_mark_proxy_end(pod->slot, &t);
			}
		}
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		mcni_established(skops, pod, netns);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE) {
			struct mcni_tuple t = {};
			mcni_sockops_tuple(skops, &t, netns);
			mcni_pair_origdst_v1.delete(&t);
			mcni_nosplice_v1.delete(&t);
		}
		break;
	}
	return 1;
}
