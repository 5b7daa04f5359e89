/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Helpers that touch maps, shared by every hook. They live in a .c file compiled into the same unit as the
 * hooks rather than in include/meshcni.h because bcc rewrites map methods (.lookup, .update) only in its main
 * source text; in a header they would compile to indirect calls the verifier rejects.
 */
#include "meshcni.h"

static __always_inline void mcni_count(__u32 slot, __u32 counter, __u64 n)
{
	struct mcni_counters *c = mcni_counters_v1.lookup(&slot);
	if (c && counter < MCNI_CTR_MAX)
		c->v[counter] += n;
}

/* One connection event, if a watcher wants them (see struct mcni_event). `task`: the decision runs in the
 * connecting process (connect hooks), so its pid, uid and name are worth recording. */
static __always_inline void mcni_event(__u32 slot, __u8 kind, __u8 reason, __u16 family, const struct mcni_ip *src,
				       __u16 sport, const struct mcni_ip *dst, __u16 dport, int task)
{
	__u32 key = MCNI_EV_CTL_ON;
	__u64 *on = mcni_events_ctl_v1.lookup(&key);
	if (!on || !*on)
		return;
	struct mcni_event *e = mcni_events_v1.ringbuf_reserve(sizeof(struct mcni_event));
	if (!e) {
		key = MCNI_EV_CTL_LOST;
		__u64 *lost = mcni_events_ctl_v1.lookup(&key);
		if (lost)
			__sync_fetch_and_add(lost, 1);
		return;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->slot = slot;
	e->kind = kind;
	e->reason = reason;
	e->family = family;
	e->src = *src;
	e->dst = *dst;
	e->sport = sport;
	e->dport = dport;
	e->_pad = 0;
	if (task) {
		e->pid = bpf_get_current_pid_tgid() >> 32;
		e->uid = (__u32)bpf_get_current_uid_gid();
		bpf_get_current_comm(e->comm, sizeof(e->comm));
	} else {
		e->pid = 0;
		e->uid = 0;
		__builtin_memset(e->comm, 0, sizeof(e->comm));
	}
	mcni_events_v1.ringbuf_submit(e, 0);
}

static __always_inline struct mcni_pod *mcni_pod_by_netns(__u64 netns)
{
	__u32 *slot = mcni_pods_v1.lookup(&netns);
	if (!slot)
		return 0;
	return mcni_pod_config_v1.lookup(slot);
}

static __always_inline __u8 mcni_port_policy(__u32 slot, __u16 port, __u8 dir)
{
	struct mcni_port_key key = { .slot = slot, .port = port, .dir = dir };
	__u8 *v = mcni_ports_v1.lookup(&key);
	return v ? *v : 0;
}

static __always_inline int mcni_cidr_match(__u32 slot, __u32 kind, const struct mcni_ip *ip)
{
	struct mcni_cidr_key key = { .prefixlen = 64 + 128, .slot = slot, .kind = kind };
	key.ip = *ip;
	return mcni_cidrs_v1.lookup(&key) != 0;
}


/* Whether an established socket may be put into mcni_socks_v1. Only sockets whose peer can be on this node
 * are worth a psock: a loopback pair (both ends in this netns) or a peer address that is a pod here (the
 * peer may sit in another pod's netns; tuples of such pairs carry netns 0 and find each other by pod IP).
 * Any other peer is off-node and the redirect could never succeed. Note that a psock changes how the
 * socket's recvmsg behaves (tcp_bpf_recvmsg): see "Splicing" in docs/architecture.md. */
static __always_inline int mcni_splice_candidate(const struct mcni_tuple *t)
{
	if (t->netns)
		return 1;
	return mcni_pod_ips_v1.lookup((struct mcni_ip *)&t->remote) != 0;
}

/* Whether a tuple can be one end of a proxy <-> proxy connection on this node: between pod IPs (not loopback,
 * whose peer in the same netns is never steered to the proxy) and not the proxy's 127.0.0.6 / ::6 passthrough
 * to its own app. Sockops takes the proxy's sockets with such tuples for proxy ends: the outgoing ones it
 * marked at connect(), the accepted ones its listener's mark was cloned onto. */
static __always_inline int mcni_proxy_pair_candidate(const struct mcni_tuple *t)
{
	if (t->netns || mcni_ip_is_passthrough(&t->local) || mcni_ip_is_passthrough(&t->remote))
		return 0;
	return mcni_pod_ips_v1.lookup((struct mcni_ip *)&t->remote) != 0;
}

