/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * cgroup/connect4 and cgroup/connect6: outbound capture.
 *
 * For a TCP connect() from an enrolled pod (its netns cookie is in mcni_pods_v1) by anyone but the pod's
 * proxy, to a destination the pod's policy captures: remember the original destination under the socket
 * cookie and rewrite the destination to the proxy's outbound listener on loopback. Doing this at connect()
 * time instead of with NAT means no conntrack entry and no per-packet work at all.
 */
#include "meshcni.h"

static __always_inline int mcni_outbound_captured(const struct mcni_pod *pod, const struct mcni_ip *dst,
						  __u16 port)
{
	/* Istio's precedence: excluded ports, then included ports, then excluded and included ranges. */
	__u8 by_port = mcni_port_policy(pod->slot, port, MCNI_DIR_OUTBOUND);
	if (by_port == MCNI_POLICY_EXCLUDE)
		return 0;
	if (by_port == MCNI_POLICY_INCLUDE)
		return 1;
	if (mcni_cidr_match(pod->slot, MCNI_POLICY_EXCLUDE, dst))
		return 0;
	if (pod->flags & MCNI_F_OUTBOUND_ALL_CIDRS)
		return 1;
	return mcni_cidr_match(pod->slot, MCNI_POLICY_INCLUDE, dst);
}

static __always_inline void mcni_connect_event(const struct mcni_pod *pod, __u8 kind, __u8 reason, __u16 family,
					       const struct mcni_ip *dst, __u16 port)
{
	struct mcni_ip none = {};
	mcni_event(pod->slot, kind, reason, family, &none, 0, dst, port, 1);
}

/* Returns the pod when this connect() should be captured, 0 to leave it alone. */
static __always_inline struct mcni_pod *mcni_connect_pod(struct bpf_sock_addr *ctx, const struct mcni_ip *dst,
							  __u16 port, __u16 family)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	struct mcni_pod *pod = mcni_pod_by_netns(bpf_get_netns_cookie(ctx));
	if (!pod || !(pod->flags & MCNI_F_CAPTURE_OUTBOUND))
		return 0;
	__u64 uid_gid = bpf_get_current_uid_gid();
	__u8 why = MCNI_WHY_NONE;
	if ((__u32)uid_gid == pod->proxy_uid || (__u32)(uid_gid >> 32) == pod->proxy_gid)
		why = MCNI_WHY_PROXY;
	else if (mcni_ip_is_loopback(dst))
		why = MCNI_WHY_LOOPBACK;
	else if (!mcni_outbound_captured(pod, dst, port))
		why = MCNI_WHY_POLICY;
	if (why != MCNI_WHY_NONE) {
		mcni_count(pod->slot, MCNI_CTR_BYPASSED, 1);
		mcni_connect_event(pod, MCNI_EV_OUTBOUND_BYPASSED, why, family, dst, port);
		return 0;
	}
	return pod;
}

static __always_inline int mcni_remember(struct bpf_sock_addr *ctx, const struct mcni_pod *pod,
					 const struct mcni_ip *dst, __u16 port, __u16 family)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct mcni_origdst orig = { .port = port, .family = family, .slot = pod->slot };
	orig.ip = *dst;
	if (mcni_sock_origdst_v1.update(&cookie, &orig) != 0) {
		/* Without the record the proxy could not learn the destination: leave the connect alone. */
		mcni_count(pod->slot, MCNI_CTR_ERRORS, 1);
		mcni_connect_event(pod, MCNI_EV_ERROR, MCNI_WHY_NONE, family, dst, port);
		return 0;
	}
	mcni_count(pod->slot, MCNI_CTR_OUTBOUND_CAPTURED, 1);
	mcni_connect_event(pod, MCNI_EV_OUTBOUND_CAPTURED, MCNI_WHY_NONE, family, dst, port);
	return 1;
}

int mcni_connect4(struct bpf_sock_addr *ctx)
{
	struct mcni_ip dst;
	mcni_ip_from_v4(&dst, ctx->user_ip4);
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	struct mcni_pod *pod = mcni_connect_pod(ctx, &dst, port, AF_INET);
	if (pod && mcni_remember(ctx, pod, &dst, port, AF_INET)) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = bpf_htons(pod->outbound_port);
	}
	return 1; /* 1 = let connect() proceed */
}

int mcni_connect6(struct bpf_sock_addr *ctx)
{
	struct mcni_ip dst;
	__u32 w[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	mcni_ip_from_v6(&dst, w);
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	struct mcni_pod *pod = mcni_connect_pod(ctx, &dst, port, AF_INET6);
	if (pod && mcni_remember(ctx, pod, &dst, port, AF_INET6)) {
		if (mcni_ip_is_v4(&dst)) {
			/* a v4-mapped destination on a dual-stack socket reaches the IPv4 listener */
			ctx->user_ip6[0] = 0;
			ctx->user_ip6[1] = 0;
			ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
			ctx->user_ip6[3] = bpf_htonl(0x7f000001);
		} else {
			ctx->user_ip6[0] = 0;
			ctx->user_ip6[1] = 0;
			ctx->user_ip6[2] = 0;
			ctx->user_ip6[3] = bpf_htonl(1);
		}
		ctx->user_port = bpf_htons(pod->outbound_port);
	}
	return 1;
}
