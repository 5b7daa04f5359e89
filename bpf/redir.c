/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * sk_msg on mcni_socks_v1: splice the two ends of a local connection.
 *
 * A message sent on one end is queued directly on the receive queue of the peer socket (BPF_F_INGRESS),
 * skipping TCP, IP and the loopback or veth device. When the peer is not in the map (it is off-node, or not
 * yet established) the redirect helper fails and the program still answers SK_PASS, so the message takes
 * the normal TCP path: SK_DROP there would discard the application's bytes. A stream that used TCP once
 * stays on TCP (mcni_stays_on_tcp_v1, the socket's own storage), because the peer's receive path reads the
 * sk_msg queue before the TCP queue and a later spliced message would overtake bytes still in flight.
 */
#include "meshcni.h"

int mcni_redir(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	if (!sk)
		return SK_PASS;
	if (mcni_stays_on_tcp_v1.sk_storage_get(sk, 0, 0))
		return SK_PASS;

	struct mcni_tuple self = {};
	if (msg->family == AF_INET) {
		mcni_ip_from_v4(&self.local, MCNI_CTX_U32(msg, local_ip4));
		mcni_ip_from_v4(&self.remote, MCNI_CTX_U32(msg, remote_ip4));
	} else {
		__u32 l[4] = { MCNI_CTX_U32(msg, local_ip6[0]), MCNI_CTX_U32(msg, local_ip6[1]), MCNI_CTX_U32(msg, local_ip6[2]), MCNI_CTX_U32(msg, local_ip6[3]) };
		__u32 r[4] = { MCNI_CTX_U32(msg, remote_ip6[0]), MCNI_CTX_U32(msg, remote_ip6[1]), MCNI_CTX_U32(msg, remote_ip6[2]), MCNI_CTX_U32(msg, remote_ip6[3]) };
		mcni_ip_from_v6(&self.local, l);
		mcni_ip_from_v6(&self.remote, r);
	}
	self.local_port = (__u16)MCNI_CTX_U32(msg, local_port);
	self.remote_port = (__u16)bpf_ntohl(MCNI_CTX_U32(msg, remote_port));
	__u64 netns = bpf_get_netns_cookie(msg);
	mcni_tuple_scope(&self, netns);

	struct mcni_tuple peer;
	mcni_tuple_reverse(&self, &peer);
	long verdict = mcni_socks_v1.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	__u32 *slot = mcni_pods_v1.lookup(&netns);
	if (verdict != SK_PASS) {
		/* the peer is not (yet) in the map: this message takes TCP, and so must every later one */
		if (!mcni_stays_on_tcp_v1.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE) && slot)
			mcni_count(*slot, MCNI_CTR_ERRORS, 1); /* no memory: a later message could overtake this one */
	} else if (slot) {
		/* one counters lookup for both (this runs for every message) */
		struct mcni_counters *c = mcni_counters_v1.lookup(slot);
		if (c) {
			c->v[MCNI_CTR_MSGS_SPLICED] += 1;
			c->v[MCNI_CTR_BYTES_SPLICED] += msg->size;
		}
	}
	return SK_PASS;
}
