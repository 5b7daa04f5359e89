/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * sk_lookup (one bpf_link per enrolled pod netns): inbound capture.
 *
 * A SYN for a pod port is given to the proxy's inbound listener (held in mcni_listeners_v1) instead of the
 * app's socket. The packet is not rewritten, so the accepted socket's local address is the original
 * destination and the proxy needs no SO_ORIGINAL_DST at all. sk_lookup cannot read the netns cookie (the
 * helper is not allowed for this program type as of 6.18), so the pod is found by its destination IP.
 * Sockets can be swapped in the map at any time: that is the lever for proxy hot upgrades.
 *
 * The proxy's accepted socket needs no record here to be told from an app's when it becomes established: it
 * inherits the mark on the proxy's listener (mcni_proxy_listener_v1, see sockops.c). That matters, because
 * this program cannot see the segment's flags and runs for any TCP segment that finds no socket: a stray ACK
 * or FIN of a connection already reset is steered (and counted) like a SYN, and the listener answers it with a
 * reset.
 */
#include "meshcni.h"

int mcni_sk_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;

	struct mcni_ip dst, src;
	__u32 v6 = 0;
	if (ctx->family == AF_INET) {
		mcni_ip_from_v4(&dst, MCNI_CTX_U32(ctx, local_ip4));
		mcni_ip_from_v4(&src, MCNI_CTX_U32(ctx, remote_ip4));
	} else {
		__u32 l[4] = { MCNI_CTX_U32(ctx, local_ip6[0]), MCNI_CTX_U32(ctx, local_ip6[1]), MCNI_CTX_U32(ctx, local_ip6[2]), MCNI_CTX_U32(ctx, local_ip6[3]) };
		__u32 r[4] = { MCNI_CTX_U32(ctx, remote_ip6[0]), MCNI_CTX_U32(ctx, remote_ip6[1]), MCNI_CTX_U32(ctx, remote_ip6[2]), MCNI_CTX_U32(ctx, remote_ip6[3]) };
		mcni_ip_from_v6(&dst, l);
		mcni_ip_from_v6(&src, r);
		v6 = 1;
	}
	if (mcni_ip_is_loopback(&dst) || mcni_ip_is_passthrough(&src))
		return SK_PASS; /* the pod's own localhost traffic, and the proxy's passthrough to the app */

	__u32 *slot = mcni_pod_ips_v1.lookup(&dst);
	if (!slot)
		return SK_PASS;
	struct mcni_pod *pod = mcni_pod_config_v1.lookup(slot);
	if (!pod || !(pod->flags & MCNI_F_CAPTURE_INBOUND))
		return SK_PASS;

	__u16 port = (__u16)MCNI_CTX_U32(ctx, local_port);
	__u16 sport = bpf_ntohs((__u16)MCNI_CTX_U32(ctx, remote_port));
	__u16 family = v6 ? AF_INET6 : AF_INET;
	__u8 policy = mcni_port_policy(pod->slot, port, MCNI_DIR_INBOUND);
	if (port == pod->inbound_port || port == pod->outbound_port || policy == MCNI_POLICY_EXCLUDE ||
	    (!(pod->flags & MCNI_F_INBOUND_ALL_PORTS) && policy != MCNI_POLICY_INCLUDE)) {
		mcni_count(pod->slot, MCNI_CTR_BYPASSED, 1);
		__u8 why = (port == pod->inbound_port || port == pod->outbound_port) ? MCNI_WHY_CAPTURE_PORT : MCNI_WHY_POLICY;
		mcni_event(pod->slot, MCNI_EV_INBOUND_BYPASSED, why, family, &src, sport, &dst, port, 0);
		return SK_PASS;
	}

	__u32 idx = pod->slot * 2 + v6;
	struct bpf_sock *sk = (struct bpf_sock *)mcni_listeners_v1.lookup(&idx);
	if (!sk) {
		mcni_count(pod->slot, MCNI_CTR_NO_LISTENER, 1);
		mcni_event(pod->slot, MCNI_EV_INBOUND_NO_LISTENER, MCNI_WHY_NONE, family, &src, sport, &dst, port, 0);
		return SK_PASS;
	}
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		mcni_count(pod->slot, MCNI_CTR_ERRORS, 1);
		mcni_event(pod->slot, MCNI_EV_ERROR, MCNI_WHY_NONE, family, &src, sport, &dst, port, 0);
		return SK_PASS;
	}
	mcni_count(pod->slot, MCNI_CTR_INBOUND_STEERED, 1);
	mcni_event(pod->slot, MCNI_EV_INBOUND_STEERED, MCNI_WHY_NONE, family, &src, sport, &dst, port, 0);
	return SK_PASS;
}
