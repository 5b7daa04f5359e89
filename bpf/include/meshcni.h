/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * meshcni BPF datapath: shared constants, structures and every map.
 *
 * All maps are pinned under MCNI_PIN_DIR (a -D cflag set by the loader) so that an agent restart re-opens
 * the same maps instead of creating new ones, and every name carries a _v1 suffix: a change of layout gets
 * a new suffix, so an upgraded agent can never misread a map pinned by an older one.
 *
 * Addresses are kept as 16-byte IPv6 values everywhere; IPv4 is stored v4-mapped (::ffff:a.b.c.d, RFC 4291
 * section 2.5.5.2), which lets one map and one code path serve both families.
 */
#ifndef MESHCNI_H
#define MESHCNI_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/if_ether.h>
#include <linux/socket.h>

#ifndef MCNI_PIN_DIR
#error "MCNI_PIN_DIR must be set by the loader"
#endif
#ifndef MCNI_MAX_PODS
#define MCNI_MAX_PODS 1024
#endif
#ifndef MCNI_MAX_CONNS
#define MCNI_MAX_CONNS 65536
#endif

#define MCNI_PIN(name) MCNI_PIN_DIR "/" #name

/* Context fields must be read at their exact offsets: the verifier rejects a load through a context pointer
 * the compiler has moved (clang likes to compute ctx+off once and load through it later, for example when
 * local_ip4 and local_ip6 are read on different branches). Inline asm pins each load to ctx + offsetof. */
#define MCNI_CTX_U32(ctx, field)                                                           \
	({                                                                                  \
		__u32 __v;                                                                  \
		asm volatile("%0 = *(u32 *)(%1 + %2)"                                       \
			     : "=r"(__v)                                                    \
			     : "r"(ctx), "i"(__builtin_offsetof(typeof(*(ctx)), field)));   \
		__v;                                                                        \
	})

/* Pod flags (struct mcni_pod.flags). */
#define MCNI_F_CAPTURE_OUTBOUND   (1u << 0)  /* connect() of the app goes to the proxy */
#define MCNI_F_CAPTURE_INBOUND    (1u << 1)  /* SYNs to the pod go to the proxy's inbound listener */
#define MCNI_F_INBOUND_ALL_PORTS  (1u << 2)  /* includeInboundPorts: "*" */
#define MCNI_F_OUTBOUND_ALL_CIDRS (1u << 3)  /* includeOutboundIPRanges: "*" */
#define MCNI_F_SPLICE             (1u << 4)  /* splice proxy<->proxy pairs on this node with sk_msg */
#define MCNI_F_SPLICE_APP         (1u << 5)  /* with MCNI_F_SPLICE: the app's own sockets may be spliced too */
#define MCNI_F_KEYS_COUNTED       (1u << 31) /* user space only: policy_keys and ip_keys are valid */

/* Port and CIDR policy kinds. */
#define MCNI_DIR_INBOUND  1
#define MCNI_DIR_OUTBOUND 2
#define MCNI_POLICY_EXCLUDE 1
#define MCNI_POLICY_INCLUDE 2

/* From <linux/netfilter_ipv4.h> / <linux/netfilter_ipv6/ip6_tables.h>: both are 80. */
#define MCNI_SO_ORIGINAL_DST 80
#define MCNI_SOL_IP   0
#define MCNI_SOL_IPV6 41

/* Istio's inbound passthrough source: the proxy connects to the app from here, never re-captured. */
#define MCNI_PASSTHROUGH_V4 0x7f000006 /* 127.0.0.6 */

struct mcni_ip {
	__u32 w[4]; /* network byte order, v4-mapped for IPv4 */
};

/* Capture settings of one pod; the agent writes it on enrol. */
struct mcni_pod {
	__u32 slot;          /* index into the per-slot maps (counters, listeners) */
	__u32 flags;         /* MCNI_F_* */
	__u32 proxy_uid;
	__u32 proxy_gid;
	__u16 outbound_port; /* host byte order */
	__u16 inbound_port;  /* host byte order */
	/* User space's bookkeeping, never read here: how many mcni_ports_v1 + mcni_cidrs_v1 keys and how many
	 * mcni_pod_ips_v1 keys the slot owns, valid with MCNI_F_KEYS_COUNTED. A release deletes exactly those
	 * keys instead of scanning maps every pod shares. */
	__u16 policy_keys;
	__u16 ip_keys;
};

/* A connection as seen from one end. netns is the netns cookie when either address is loopback (such
 * tuples repeat in every pod) and 0 otherwise (pod IPs are unique on the node, and the two ends of a
 * pod-to-pod connection live in different namespaces yet must find each other). */
struct mcni_tuple {
	__u64 netns;
	struct mcni_ip local;
	struct mcni_ip remote;
	__u16 local_port;   /* host byte order */
	__u16 remote_port;  /* host byte order */
	__u32 _pad;
};

struct mcni_origdst {
	struct mcni_ip ip;
	__u16 port;   /* host byte order */
	__u16 family; /* AF_INET or AF_INET6: what the app asked for */
	__u32 slot;
};

struct mcni_port_key {
	__u32 slot;
	__u16 port;   /* host byte order */
	__u8 dir;     /* MCNI_DIR_* */
	__u8 _pad;
};

struct mcni_cidr_key {
	__u32 prefixlen; /* 64 + address prefix bits (v4-mapped: 64 + 96 + v4 prefix) */
	__u32 slot;
	__u32 kind;      /* MCNI_POLICY_* */
	struct mcni_ip ip;
};

/* Per-pod counters, one array per possible CPU, summed by the agent. The Python side names the indexes in
 * the same order (meshcni/datapath/layout.py), so append only. */
enum mcni_counter {
	MCNI_CTR_OUTBOUND_CAPTURED, /* app connect() rewritten to the proxy */
	MCNI_CTR_INBOUND_STEERED,   /* SYN assigned to the proxy's inbound listener */
	MCNI_CTR_BYPASSED,          /* traffic of an enrolled pod left alone by policy or because it is the proxy's */
	MCNI_CTR_MSGS_SPLICED,      /* sendmsg() calls moved straight to the peer socket */
	MCNI_CTR_BYTES_SPLICED,
	MCNI_CTR_NO_LISTENER,       /* inbound SYN for a pod whose proxy listener is not registered */
	MCNI_CTR_ERRORS,            /* a helper or map update failed: counted, never silent */
	MCNI_CTR_MAX,
};

struct mcni_counters {
	__u64 v[MCNI_CTR_MAX];
};

/* Connection events for `meshcni events`, one per capture decision, written only while someone watches
 * (mcni_events_ctl_v1[MCNI_EV_CTL_ON] != 0): with nobody watching a decision costs one array lookup more. The
 * Python side decodes the same layout (meshcni/datapath/layout.py), so change both together. */
enum mcni_event_kind {
	MCNI_EV_OUTBOUND_CAPTURED = 1, /* connect() rewritten to the proxy */
	MCNI_EV_OUTBOUND_BYPASSED,     /* connect() left alone: see reason */
	MCNI_EV_INBOUND_STEERED,       /* SYN given to the proxy's inbound listener */
	MCNI_EV_INBOUND_BYPASSED,      /* SYN left to the app: see reason */
	MCNI_EV_INBOUND_NO_LISTENER,   /* SYN for a pod whose proxy listener is not registered */
	MCNI_EV_ERROR,                 /* a map update or helper failed; the connection went its own way */
};

enum mcni_event_reason {
	MCNI_WHY_NONE,
	MCNI_WHY_PROXY,        /* the pod's proxy (uid/gid) made it */
	MCNI_WHY_LOOPBACK,     /* to localhost */
	MCNI_WHY_POLICY,       /* an excluded (or not included) port or range */
	MCNI_WHY_CAPTURE_PORT, /* addressed to the proxy's own capture ports */
};

struct mcni_event {
	__u64 ts_ns;        /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
	__u32 slot;
	__u32 pid;          /* outbound: the connecting process (tgid); inbound: 0, a SYN has no task */
	__u32 uid;          /* outbound: its uid; inbound: 0 */
	__u8 kind;          /* MCNI_EV_* */
	__u8 reason;        /* MCNI_WHY_* */
	__u16 family;       /* AF_INET or AF_INET6 */
	struct mcni_ip src; /* inbound: the peer; outbound: zero (not bound yet at connect()) */
	struct mcni_ip dst; /* the original destination */
	__u16 sport;        /* host byte order */
	__u16 dport;        /* host byte order */
	__u32 _pad;
	char comm[16];      /* outbound: the connecting task's name */
};

#define MCNI_EV_CTL_ON   0 /* != 0 while a watcher reads mcni_events_v1 */
#define MCNI_EV_CTL_LOST 1 /* events dropped because the ring was full */
#define MCNI_EV_RING_BYTES (256 * 1024)

/* netns cookie of an enrolled pod -> its slot. The presence of a key is what "enrolled" means. */
BPF_TABLE_PINNED("hash", __u64, __u32, mcni_pods_v1, MCNI_MAX_PODS, MCNI_PIN(mcni_pods_v1));
/* slot -> capture settings. */
BPF_TABLE_PINNED("array", __u32, struct mcni_pod, mcni_pod_config_v1, MCNI_MAX_PODS, MCNI_PIN(mcni_pod_config_v1));
/* pod IP on this node -> slot: which pod an inbound SYN is for, and which peers are local (spliceable). */
BPF_TABLE_PINNED("hash", struct mcni_ip, __u32, mcni_pod_ips_v1, MCNI_MAX_PODS * 4, MCNI_PIN(mcni_pod_ips_v1));
/* (slot, port, direction) -> MCNI_POLICY_*: include/exclude ports. */
BPF_TABLE_PINNED("hash", struct mcni_port_key, __u8, mcni_ports_v1, MCNI_MAX_PODS * 16, MCNI_PIN(mcni_ports_v1));
/* (slot, kind, CIDR) -> the entry's own address prefix length: include/exclude outbound CIDRs, longest-prefix
 * matched per kind. The programs only test presence; the value lets user space tell an exact match from a
 * shorter prefix that covers the key. */
BPF_F_TABLE("lpm_trie:" MCNI_PIN(mcni_cidrs_v1), struct mcni_cidr_key, __u8, mcni_cidrs_v1, MCNI_MAX_PODS * 16,
            BPF_F_NO_PREALLOC);
/* The original destination of a captured connection travels in three steps, each written before the next
 * reader can run, so no ordering of the two ends' callbacks can lose it:
 *   connect4 (app's connect(), tuple unknown) -> mcni_sock_origdst_v1 by socket cookie;
 *   sockops TCP_CONNECT_CB (same connect(), source port bound, SYN not yet sent) -> mcni_pair_origdst_v1 by the
 *     app-side tuple;
 *   sockops PASSIVE_ESTABLISHED of the proxy's accepted socket (before accept() can return it) ->
 *     mcni_accepted_origdst_v1, storage of that socket, which getsockopt reads and which dies with it.
 * The record therefore never depends on the app's socket still existing: an app that sent and closed before
 * its busy proxy accepted (a client giving up, wrk exiting) still gets proxied to where it was going. */
/* socket cookie of a captured app socket -> where it wanted to go; lives from connect4 to TCP_CONNECT_CB. */
BPF_TABLE_PINNED("lru_hash", __u64, struct mcni_origdst, mcni_sock_origdst_v1, MCNI_MAX_CONNS,
                 MCNI_PIN(mcni_sock_origdst_v1));
/* app-side tuple of a captured connection -> original destination; lives from the SYN until the proxy's end
 * is established (or the app's connect fails). LRU bounds what a handshake the proxy never completed (its
 * accept queue overflowed) leaves behind. */
BPF_TABLE_PINNED("lru_hash", struct mcni_tuple, struct mcni_origdst, mcni_pair_origdst_v1, MCNI_MAX_CONNS,
                 MCNI_PIN(mcni_pair_origdst_v1));
/* Socket-local storage, pinned: bcc's BPF_SK_STORAGE has no pinned form, so this declares what it would, with
 * the pin path in the section name as BPF_TABLE_PINNED does. The kernel frees an entry with its socket; with
 * BPF_F_CLONE in _flags, a listener's entry is copied to every socket it accepts. */
#define MCNI_SK_STORAGE_PINNED(_name, _leaf_type, _flags)                                      \
	struct _name##_table_t {                                                               \
		int key;                                                                       \
		_leaf_type leaf;                                                               \
		void *(*sk_storage_get)(void *, void *, int);                                  \
		int (*sk_storage_delete)(void *);                                              \
		u32 flags;                                                                     \
	};                                                                                     \
	__attribute__((section("maps/sk_storage:" MCNI_PIN(_name))))                           \
	struct _name##_table_t _name = { .flags = BPF_F_NO_PREALLOC | (_flags) };              \
	BPF_ANNOTATE_KV_PAIR(_name, int, _leaf_type)
/* the proxy's accepted socket of a captured connection -> original destination, read by getsockopt; nothing
 * has to delete it. */
MCNI_SK_STORAGE_PINNED(mcni_accepted_origdst_v1, struct mcni_origdst, 0);
/* tuple -> established local socket, for sk_msg splicing; the kernel drops entries of closed sockets. */
struct mcni_socks_v1_table_t {
	struct mcni_tuple key;
	int leaf;
	int (*update)(struct mcni_tuple *, int *);
	int (*delete)(struct mcni_tuple *);
	/* bcc's BPF_SOCKHASH has no pinned form; these members are what its rewriter turns into helpers */
	int (*sock_hash_update)(void *, void *, u64);
	int (*msg_redirect_hash)(void *, void *, u64);
	int (*sk_redirect_hash)(void *, void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/sockhash:" MCNI_PIN(mcni_socks_v1))))
struct mcni_socks_v1_table_t mcni_socks_v1 = { .max_entries = MCNI_MAX_CONNS };
/* set on the proxy's inbound listener (by sockops when the proxy listens, by the agent when it registers one)
 * and cloned by the kernel onto every socket that listener accepts: what tells the proxy's accepted end of a
 * proxy <-> proxy pair from an app's at PASSIVE_ESTABLISHED, which runs in softirq with no owner to ask. The
 * mark comes with the socket and goes with it, so nothing is recorded per connection and nothing is left
 * behind by a handshake that never completes. */
MCNI_SK_STORAGE_PINNED(mcni_proxy_listener_v1, __u8, BPF_F_CLONE);
/* a spliceable socket that sent data the normal way once (its peer was not in mcni_socks_v1 yet): it must never
 * be spliced afterwards, or its peer would read spliced bytes ahead of bytes still queued in TCP (the peer's
 * receive path reads the sk_msg queue first). Socket-local, so the mark dies with the socket: no close has to
 * be watched, and a later connection that reuses the tuple starts unmarked. */
MCNI_SK_STORAGE_PINNED(mcni_stays_on_tcp_v1, __u8, 0);
/* slot*2 + (IPv6 ? 1 : 0) -> the proxy's inbound listening socket, for sk_lookup; written by the agent and,
 * when the proxy calls listen(), by sockops. Spelled out like mcni_socks_v1 for the sock_map_update member. */
struct mcni_listeners_v1_table_t {
	__u32 key;
	__u64 leaf;
	__u64 *(*lookup)(__u32 *);
	int (*update)(__u32 *, __u64 *);
	int (*delete)(__u32 *);
	int (*sock_map_update)(void *, void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/sockmap:" MCNI_PIN(mcni_listeners_v1))))
struct mcni_listeners_v1_table_t mcni_listeners_v1 = { .max_entries = MCNI_MAX_PODS * 2 };
/* slot -> counters. */
BPF_TABLE_PINNED("percpu_array", __u32, struct mcni_counters, mcni_counters_v1, MCNI_MAX_PODS,
                 MCNI_PIN(mcni_counters_v1));
/* MCNI_EV_CTL_* -> value: whether events are wanted, and how many the full ring dropped. */
BPF_TABLE_PINNED("array", __u32, __u64, mcni_events_ctl_v1, 2, MCNI_PIN(mcni_events_ctl_v1));
/* The events themselves. bcc's BPF_RINGBUF_OUTPUT has no pinned form; spelled out like mcni_socks_v1. */
struct mcni_events_v1_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf:" MCNI_PIN(mcni_events_v1))))
struct mcni_events_v1_table_t mcni_events_v1 = { .max_entries = MCNI_EV_RING_BYTES };

static __always_inline void mcni_ip_from_v4(struct mcni_ip *ip, __u32 addr_be)
{
	ip->w[0] = 0;
	ip->w[1] = 0;
	ip->w[2] = bpf_htonl(0x0000ffff);
	ip->w[3] = addr_be;
}

static __always_inline void mcni_ip_from_v6(struct mcni_ip *ip, const __u32 *w)
{
	ip->w[0] = w[0];
	ip->w[1] = w[1];
	ip->w[2] = w[2];
	ip->w[3] = w[3];
}

static __always_inline int mcni_ip_is_v4(const struct mcni_ip *ip)
{
	return ip->w[0] == 0 && ip->w[1] == 0 && ip->w[2] == bpf_htonl(0x0000ffff);
}

/* 127.0.0.0/8 (RFC 1122 section 3.2.1.3) or ::1 (RFC 4291 section 2.5.3). */
static __always_inline int mcni_ip_is_loopback(const struct mcni_ip *ip)
{
	if (mcni_ip_is_v4(ip))
		return (bpf_ntohl(ip->w[3]) >> 24) == 127;
	return ip->w[0] == 0 && ip->w[1] == 0 && ip->w[2] == 0 && ip->w[3] == bpf_htonl(1);
}

static __always_inline int mcni_ip_is_passthrough(const struct mcni_ip *ip)
{
	/* Istio uses 127.0.0.6 for IPv4 and ::6 for IPv6 */
	if (mcni_ip_is_v4(ip))
		return ip->w[3] == bpf_htonl(MCNI_PASSTHROUGH_V4);
	return ip->w[0] == 0 && ip->w[1] == 0 && ip->w[2] == 0 && ip->w[3] == bpf_htonl(6);
}

/* Fill the "netns" part of a tuple: see struct mcni_tuple. */
static __always_inline void mcni_tuple_scope(struct mcni_tuple *t, __u64 netns)
{
	t->netns = (mcni_ip_is_loopback(&t->local) || mcni_ip_is_loopback(&t->remote)) ? netns : 0;
}

static __always_inline void mcni_tuple_reverse(const struct mcni_tuple *in, struct mcni_tuple *out)
{
	out->netns = in->netns;
	out->local = in->remote;
	out->remote = in->local;
	out->local_port = in->remote_port;
	out->remote_port = in->local_port;
	out->_pad = 0;
}

#endif /* MESHCNI_H */
