/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * cgroup/getsockopt: answer SO_ORIGINAL_DST for the proxy.
 *
 * Proxies written for iptables REDIRECT (Envoy's original_dst listener filter, HAProxy's transparent
 * `server 0.0.0.0`) ask getsockopt(SOL_IP, SO_ORIGINAL_DST) on the accepted socket. With connect-time
 * capture there is no conntrack entry, so the kernel fails the call; this program replaces the result with
 * the destination sockops stored on the proxy's accepted socket (mcni_accepted_origdst_v1). Only when that
 * storage could not be created is the record still under the app-side tuple, found by reversing the proxy's
 * own; that costs a tuple and a hash lookup, so it is tried for loopback sockets only (capture lands on
 * loopback; a connection steered inbound keeps its pod address and needs no answer from us).
 */
#include "meshcni.h"

struct mcni_sockaddr_in {
	__u16 family;
	__u16 port;   /* network byte order */
	__u32 addr;   /* network byte order */
	__u8 zero[8];
};

struct mcni_sockaddr_in6 {
	__u16 family;
	__u16 port;
	__u32 flowinfo;
	__u32 addr[4];
	__u32 scope_id;
};

/* The record under the app-side tuple, for a loopback socket whose storage could not be created. */
static __always_inline struct mcni_origdst *mcni_origdst_by_tuple(struct bpf_sockopt *ctx, struct bpf_sock *sk)
{
	struct mcni_tuple proxy_side = {};
	__u32 family = MCNI_CTX_U32(sk, family);
	if (family == AF_INET) {
		mcni_ip_from_v4(&proxy_side.local, MCNI_CTX_U32(sk, src_ip4));
		mcni_ip_from_v4(&proxy_side.remote, MCNI_CTX_U32(sk, dst_ip4));
	} else if (family == AF_INET6) {
		__u32 l[4] = { MCNI_CTX_U32(sk, src_ip6[0]), MCNI_CTX_U32(sk, src_ip6[1]), MCNI_CTX_U32(sk, src_ip6[2]), MCNI_CTX_U32(sk, src_ip6[3]) };
		__u32 r[4] = { MCNI_CTX_U32(sk, dst_ip6[0]), MCNI_CTX_U32(sk, dst_ip6[1]), MCNI_CTX_U32(sk, dst_ip6[2]), MCNI_CTX_U32(sk, dst_ip6[3]) };
		mcni_ip_from_v6(&proxy_side.local, l);
		mcni_ip_from_v6(&proxy_side.remote, r);
	} else {
		return 0;
	}
	if (!mcni_ip_is_loopback(&proxy_side.local))
		return 0;
	proxy_side.local_port = (__u16)MCNI_CTX_U32(sk, src_port);
	/* dst_port is a __be16 followed by 16 zero bits (u32 loads are allowed for compatibility) */
	proxy_side.remote_port = bpf_ntohs((__u16)MCNI_CTX_U32(sk, dst_port));
	mcni_tuple_scope(&proxy_side, bpf_get_netns_cookie(ctx));

	struct mcni_tuple app_side;
	mcni_tuple_reverse(&proxy_side, &app_side);
	return mcni_pair_origdst_v1.lookup(&app_side);
}

int mcni_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->optname != MCNI_SO_ORIGINAL_DST ||
	    (ctx->level != MCNI_SOL_IP && ctx->level != MCNI_SOL_IPV6))
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;

	struct mcni_origdst *orig = mcni_accepted_origdst_v1.sk_storage_get(sk, 0, 0);
	if (!orig)
		orig = mcni_origdst_by_tuple(ctx, sk);
	if (!orig)
		return 1; /* not ours: keep the kernel's answer */

	void *optval = ctx->optval;
	void *end = ctx->optval_end;
	if (ctx->level == MCNI_SOL_IP && mcni_ip_is_v4(&orig->ip)) {
		struct mcni_sockaddr_in *sa = optval;
		if ((void *)(sa + 1) > end)
			return 1;
		__builtin_memset(sa, 0, sizeof(*sa));
		sa->family = AF_INET;
		sa->port = bpf_htons(orig->port);
		sa->addr = orig->ip.w[3];
		ctx->optlen = sizeof(*sa);
		ctx->retval = 0;
	} else if (ctx->level == MCNI_SOL_IPV6) {
		struct mcni_sockaddr_in6 *sa6 = optval;
		if ((void *)(sa6 + 1) > end)
			return 1;
		__builtin_memset(sa6, 0, sizeof(*sa6));
		sa6->family = AF_INET6;
		sa6->port = bpf_htons(orig->port);
		sa6->addr[0] = orig->ip.w[0];
		sa6->addr[1] = orig->ip.w[1];
		sa6->addr[2] = orig->ip.w[2];
		sa6->addr[3] = orig->ip.w[3];
		ctx->optlen = sizeof(*sa6);
		ctx->retval = 0;
	}
	return 1;
}
