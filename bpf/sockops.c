/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * sockops: carry captured connections' original destinations to the proxy, and collect spliceable sockets.
 *
 * At TCP_CONNECT_CB of a captured app socket (inside its connect(), after the source port is bound and before
 * the SYN is sent) the original destination moves from the socket-cookie map to a map keyed by the app-side
 * tuple; at PASSIVE_ESTABLISHED of the proxy's accepted socket (which runs before accept() can return it) it
 * moves on into that socket's own storage, where getsockopt finds it. See the maps in meshcni.h. Sockets
 * whose peer is in the same pod (loopback) go into mcni_socks_v1 so that sk_msg can hand data straight to
 * the peer socket, subject to the pod's flags: by default (MCNI_F_SPLICE) only the sidecar proxy's own ends of
 * proxy <-> proxy connections, because inserting a socket swaps its recvmsg for tcp_bpf_recvmsg, which a
 * blocking application may not survive (see "Splicing" in docs/architecture.md); the app's sockets too only
 * with MCNI_F_SPLICE_APP. The proxy's outgoing sockets are recognised here at TCP_CONNECT_CB and carry the
 * mark on themselves (the state-callback flag, below) until ESTABLISHED; its accepted ones carry the mark the
 * kernel clones onto them from the proxy's inbound listener (mcni_proxy_listener_v1).
 *
 * BPF_SOCK_OPS_STATE_CB_FLAG is set on two kinds of connecting socket, told apart by their tuple: a captured
 * app socket (always loopback: connect4 sent it to 127.0.0.1), so that a failed connect takes its record
 * along, and the proxy's own socket to another pod's IP (never loopback), as its proxy-end mark. Both drop
 * the flag at ESTABLISHED, so each costs one state callback (SYN_SENT to ESTABLISHED) and no map entry.
 *
 * At TCP_LISTEN_CB (inside listen(2)) a socket the pod's proxy starts listening on the inbound capture port
 * goes straight into the pod's slot of mcni_listeners_v1, and is marked as the proxy's listener: inbound
 * capture starts the moment the sidecar can accept, with no window in which SYNs to the pod bypass it and no
 * agent polling for the listener. The agent still looks for listeners that existed before the pod was
 * enrolled, and marks those it registers (or holds for the proxy) itself.
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

/* The proxy's tuple never matches the app's, so the proxy's own connects need no cookie lookup. */
static __always_inline int mcni_is_proxy_task(const struct mcni_pod *pod)
{
	__u64 uid_gid = bpf_get_current_uid_gid();
	return (__u32)uid_gid == pod->proxy_uid || (__u32)(uid_gid >> 32) == pod->proxy_gid;
}

/* Move the record connect4 wrote under the socket cookie to the app-side tuple the proxy will look up. It needs
 * no enrolment: the record's existence proves connect4 captured this socket, and the pod may have been released
 * since (a live switch to iptables) while the proxy still accepts this connection. */
static __always_inline void mcni_move_origdst(struct bpf_sock_ops *skops, __u64 netns)
{
	struct mcni_tuple t = {};
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct mcni_origdst *orig = mcni_sock_origdst_v1.lookup(&cookie);
	if (!orig)
		return; /* not captured by connect4 */
	struct mcni_origdst copy = *orig;
	mcni_sockops_tuple(skops, &t, netns);
	/* written before the SYN exists, so the proxy's end can never be established without it */
	if (mcni_pair_origdst_v1.update(&t, &copy) != 0)
		mcni_count(copy.slot, MCNI_CTR_ERRORS, 1);
	else
		/* until established: a connect that fails must take its record along (see STATE_CB) */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	mcni_sock_origdst_v1.delete(&cookie);
}

/* TCP_CONNECT_CB runs from connect() itself, so the current task is the one that owns the socket: the one place
 * a proxy's outgoing socket can be told from an app's. */
static __always_inline void mcni_connecting(struct bpf_sock_ops *skops, const struct mcni_pod *pod, __u64 netns)
{
	struct mcni_tuple t = {};
	if (mcni_is_proxy_task(pod)) {
		if (pod->flags & MCNI_F_SPLICE) {
			mcni_sockops_tuple(skops, &t, netns);
			if (mcni_proxy_pair_candidate(&t))
				/* the proxy-end mark (see the top of this file); a map record would cost an LRU insert,
				 * a lookup and a delete per connection */
				bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
		}
		return;
	}
	mcni_move_origdst(skops, netns);
}

/* PASSIVE_ESTABLISHED of a socket accepted on the pod's outbound capture listener: claim the record the app's
 * connect wrote. This callback runs with the new socket locked in softirq, and accept() locks the socket before
 * handing it out, so the proxy cannot ask before the record is in place. */
static __always_inline void mcni_claim_origdst(struct bpf_sock_ops *skops, const struct mcni_pod *pod,
					       const struct mcni_tuple *proxy_side)
{
	if (!proxy_side->netns || proxy_side->local_port != pod->outbound_port)
		return; /* capture always lands on loopback, on the outbound port */
	struct mcni_tuple app_side;
	mcni_tuple_reverse(proxy_side, &app_side);
	struct mcni_origdst *orig = mcni_pair_origdst_v1.lookup(&app_side);
	if (!orig)
		return; /* a connection to the listener that was not captured (e.g. the proxy's own) */
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return;
	struct mcni_origdst *stored = mcni_accepted_origdst_v1.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!stored) {
		/* no memory for the storage: the tuple map keeps the record and getsockopt falls back to it */
		mcni_count(pod->slot, MCNI_CTR_ERRORS, 1);
		return;
	}
	*stored = *orig;
	mcni_pair_origdst_v1.delete(&app_side);
}

static __always_inline void mcni_established(struct bpf_sock_ops *skops, const struct mcni_pod *pod, __u64 netns,
					     int passive)
{
	struct mcni_tuple t = {};
	mcni_sockops_tuple(skops, &t, netns);

	int proxy_end = 0;
	if (passive) {
		mcni_claim_origdst(skops, pod, &t);
		/* accepted by the proxy's inbound listener (the mark was cloned from it) from another pod here;
		 * nothing to consume: the mark goes with the socket */
		struct bpf_sock *sk = skops->sk;
		if (sk && (pod->flags & MCNI_F_SPLICE) && mcni_proxy_listener_v1.sk_storage_get(sk, 0, 0))
			proxy_end = mcni_proxy_pair_candidate(&t);
	} else if (skops->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_STATE_CB_FLAG) {
		/* a captured app socket (loopback) is connected and its record is the proxy's now, or the proxy's
		 * own socket to a pod IP has its mark read: either way, stop watching its states */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_STATE_CB_FLAG);
		proxy_end = !t.netns;
	}
	if (!(pod->flags & MCNI_F_SPLICE))
		return;
	/* a proxy end's peer was checked to be a pod: at connect() for an outgoing end, above for an accepted one */
	if (!proxy_end && (!(pod->flags & MCNI_F_SPLICE_APP) || !mcni_splice_candidate(&t)))
		return; /* an app's socket (or the proxy's end facing its app): not without the pod's opt-in */
	/* (bcc rewrites map methods only as whole statements, hence the temporary) */
	long rc = mcni_socks_v1.sock_hash_update(skops, &t, BPF_ANY);
	if (rc != 0)
		mcni_count(pod->slot, MCNI_CTR_ERRORS, 1);
	/* no state callbacks for spliced sockets: the kernel drops them from the map when they close, and their
	 * stay-on-TCP mark is socket storage that goes with them */
}

/* The pod's proxy (by uid or gid, as for outbound) listens on the inbound port: register the socket where
 * sk_lookup takes it from. An IPv6 socket takes the second entry of the slot, as the agent registers them.
 * Overwriting is right: the newest listener (a proxy restarted or reloaded) is the one that accepts. */
static __always_inline void mcni_listening(struct bpf_sock_ops *skops, const struct mcni_pod *pod)
{
	if (!(pod->flags & MCNI_F_CAPTURE_INBOUND) || (__u16)skops->local_port != pod->inbound_port)
		return;
	if (!mcni_is_proxy_task(pod))
		return; /* the app may not claim the pod's inbound traffic by listening on the proxy's port */
	__u32 idx = pod->slot * 2 + (skops->family == AF_INET6 ? 1 : 0);
	long rc = mcni_listeners_v1.sock_map_update(skops, &idx, BPF_ANY);
	if (rc != 0)
		mcni_count(pod->slot, MCNI_CTR_ERRORS, 1);
	/* marked before listen() returns, so every connection it accepts inherits the mark */
	struct bpf_sock *sk = skops->sk;
	if (sk && !mcni_proxy_listener_v1.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE))
		mcni_count(pod->slot, MCNI_CTR_ERRORS, 1);
}

/* A socket we watch until it is established is closing. If it is a captured app socket whose connect failed (still
 * in SYN_SENT), no proxy end can exist, so its record goes; a proxy's own socket (not loopback) has none. */
static __always_inline void mcni_closed(struct bpf_sock_ops *skops, __u64 netns)
{
	if (skops->args[0] != BPF_TCP_SYN_SENT)
		return;
	struct mcni_tuple t = {};
	mcni_sockops_tuple(skops, &t, netns);
	if (t.netns)
		mcni_pair_origdst_v1.delete(&t);
}

int mcni_sockops(struct bpf_sock_ops *skops)
{
	/* The kernel calls sockops for more events than these on every TCP socket in the cgroup (RTO and window
	 * init, ECN, RTT, every state change of a flagged socket): answer those before any map lookup. */
	__u32 op = skops->op;
	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_STATE_CB &&
	    op != BPF_SOCK_OPS_TCP_LISTEN_CB)
		return 1;
	if (skops->family != AF_INET && skops->family != AF_INET6)
		return 1;
	__u64 netns = bpf_get_netns_cookie(skops);
	if (op == BPF_SOCK_OPS_STATE_CB) {
		/* flagged sockets only; cleanup must not depend on the pod still being enrolled */
		if (skops->args[1] == BPF_TCP_CLOSE)
			mcni_closed(skops, netns);
		return 1;
	}
	struct mcni_pod *pod = mcni_pod_by_netns(netns);
	if (!pod) {
		if (op == BPF_SOCK_OPS_TCP_CONNECT_CB)
			mcni_move_origdst(skops, netns); /* released between connect4 and here */
		return 1;
	}
	if (op == BPF_SOCK_OPS_TCP_CONNECT_CB)
		mcni_connecting(skops, pod, netns);
	else if (op == BPF_SOCK_OPS_TCP_LISTEN_CB)
		mcni_listening(skops, pod);
	else
		mcni_established(skops, pod, netns, op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB);
	return 1;
}
