// ztagent capture: one sched_cls program for tc ingress (clsact, direct-action).
//
// Attached on the ingress of pod host-side veths and of the node's uplink. For TCP/IPv4:
//   1. a packet that belongs to an existing socket of this netns (established, request or
//      time-wait, not a listener) is assigned to it and marked; captured flows need this
//      because their destination address is not local. That includes a SYN that reuses the
//      4-tuple of one of the agent's sockets in TIME_WAIT (the server side closed first, the
//      pod reuses its port): given to the listener instead, the kernel finds the duplicate
//      tuple and drops the SYN (reqsk_queue_hash_req), and the pod retries until its connect
//      times out. Given to the time-wait socket, the kernel answers with an ACK, the pod's RST
//      to it ends the TIME_WAIT (tcp_rfc1337=0, the default), and the pod sends its SYN again
//      after TCP_TIMEOUT_MIN (tcp_rcv_synsent_state_process), which then reaches the listener;
//   2. any other packet arriving on an enrolled pod's veth goes to the outbound listener (the
//      agent carries it with the pod's identity, also to pods on this node); else any other
//      packet to an enrolled pod's IP goes to the HBONE listener (port 15008) or the plaintext
//      inbound listener (other ports). A SYN opens a flow there; a SYN-cookie ACK completes
//      one (the kernel checks the cookie on the listener); anything else gets a reset. The
//      chosen listener is assigned and the packet marked; with no listener (the agent is down
//      or restarting) a SYN is answered with a reset sent back where it came from, so clients
//      fail at once rather than after their connect timeout, and any other packet is dropped
//      (fail closed either way: nothing reaches the destination). IP fragments of these flows are dropped: only the first would
//      carry a TCP header to look up;
//   3. everything else passes untouched: TC_ACT_UNSPEC, so filters after ours still run.
//
// The mark routes assigned packets to the local stack (ip rule fwmark -> local 0.0.0.0/0 dev
// lo). Loops: packets the agent sends from this netns leave through egress and never meet
// this ingress hook; packets crossing into another netns lose their mark. A packet that
// reaches the hook already carrying the steering mark or the agent's socket mark (in the
// masked bits) has been decided on before or comes from the agent through a device looped
// back into this netns, and passes untouched. The agent's SO_MARK must differ from the
// steering mark: the fwmark rule would otherwise send the agent's own outgoing packets to lo.
//
// Compile-time settings (passed with -D by the loader): ZT_STEER_MARK, ZT_AGENT_MARK,
// ZT_MARK_MASK, ZT_AGENT_IP (network order, 0 = any), ZT_OUTBOUND_PORT, ZT_INBOUND_PORT,
// ZT_PLAINTEXT_PORT, ZT_HBONE_PORT.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

#ifndef ZT_STEER_MARK
#define ZT_STEER_MARK 0x53a
#endif
#ifndef ZT_AGENT_MARK
#define ZT_AGENT_MARK 0x539
#endif
#ifndef ZT_MARK_MASK
#define ZT_MARK_MASK 0xfff
#endif
#ifndef ZT_AGENT_IP
#define ZT_AGENT_IP 0
#endif
#ifndef ZT_OUTBOUND_PORT
#define ZT_OUTBOUND_PORT 15001
#endif
#ifndef ZT_INBOUND_PORT
#define ZT_INBOUND_PORT 15008
#endif
#ifndef ZT_PLAINTEXT_PORT
#define ZT_PLAINTEXT_PORT 15006
#endif
#ifndef ZT_HBONE_PORT
#define ZT_HBONE_PORT 15008
#endif
#ifndef ZT_MAX_PODS
#define ZT_MAX_PODS 4096
#endif

#define ZT_PASS TC_ACT_UNSPEC
#define ZT_TCP_LISTEN 10 /* BPF_TCP_LISTEN */

BPF_HASH(inbound_pods, u32, u8, ZT_MAX_PODS);     /* pod IPv4, network order */
BPF_HASH(outbound_ifaces, u32, u8, ZT_MAX_PODS);  /* host-side veth ifindex */

static __always_inline void zt_mark(struct __sk_buff *skb)
{
    skb->mark = (skb->mark & ~(u32)ZT_MARK_MASK) | ZT_STEER_MARK;
}

/* One's-complement checksum update for a 16-bit word that changed from `old` to `new` (RFC
 * 1624 eqn. 3); the sum does not depend on byte order, so raw packet words go in as they are. */
static __always_inline u16 zt_csum_replace(u16 check, u16 old, u16 new)
{
    u32 sum = (u16)~check + (u16)~old + (u32)new;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

/* A SYN of a captured flow with no agent listener to take it: turn it into the RST|ACK the
 * destination would send for a closed port and send it back out of the device it came in
 * through, so the client fails at once (ECONNREFUSED) instead of after its connect timeout.
 * Still fail closed: nothing of the flow goes anywhere but back. Swapping the addresses and
 * ports leaves both checksums as they are; seq, ack and flags are patched in. */
static __always_inline int zt_refuse(struct __sk_buff *skb, struct ethhdr *eth, struct iphdr *ip,
                                     struct tcphdr *tcp, u32 ihl)
{
    u8 mac[ETH_ALEN];
    u16 *words = (u16 *)tcp;
    u32 payload, seq, ack;
    u16 old_flags, new_flags;
    u32 addr;
    u16 port;

    if (!tcp->syn || tcp->ack || tcp->rst)
        return TC_ACT_SHOT;
    payload = bpf_ntohs(ip->tot_len);
    if (payload < ihl + tcp->doff * 4)
        return TC_ACT_SHOT;
    payload -= ihl + tcp->doff * 4;
    seq = tcp->seq;
    ack = bpf_htonl(bpf_ntohl(seq) + 1 + payload);
    old_flags = words[6];
    tcp->rst = 1;
    tcp->ack = 1;
    tcp->syn = 0;
    tcp->fin = 0;
    tcp->psh = 0;
    tcp->urg = 0;
    tcp->ece = 0;
    tcp->cwr = 0;
    new_flags = words[6];
    tcp->check = zt_csum_replace(tcp->check, old_flags, new_flags);
    /* seq becomes 0 (the SYN carried no ACK), ack_seq becomes the SYN's seq + 1 + its data */
    tcp->check = zt_csum_replace(tcp->check, (u16)seq, 0);
    tcp->check = zt_csum_replace(tcp->check, (u16)(seq >> 16), 0);
    tcp->check = zt_csum_replace(tcp->check, (u16)tcp->ack_seq, (u16)ack);
    tcp->check = zt_csum_replace(tcp->check, (u16)(tcp->ack_seq >> 16), (u16)(ack >> 16));
    tcp->seq = 0;
    tcp->ack_seq = ack;
    port = tcp->source;
    tcp->source = tcp->dest;
    tcp->dest = port;
    addr = ip->saddr;
    ip->saddr = ip->daddr;
    ip->daddr = addr;
    __builtin_memcpy(mac, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
    return bpf_redirect(skb->ifindex, 0);
}

int zt_redirect(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip;
    struct tcphdr *tcp;
    struct bpf_sock_tuple tuple = {};
    struct bpf_sock *sk;
    u32 mark = skb->mark & ZT_MARK_MASK;
    u32 ihl;
    u16 port;
    long err;

    if (mark == ZT_STEER_MARK || mark == ZT_AGENT_MARK)
        return ZT_PASS;
    if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return ZT_PASS;
    ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP)
        return ZT_PASS;
    u32 daddr = ip->daddr;
    u32 ifindex = skb->ingress_ifindex;
    int from_pod = outbound_ifaces.lookup(&ifindex) != NULL;
    int to_pod = !from_pod && inbound_pods.lookup(&daddr) != NULL;

    if (ip->frag_off & bpf_htons(0x3fff))
        /* A fragment: no socket can be looked up for the pieces after the first, so those of a
         * captured flow would be routed as plain IP. Captured flows are never fragmented
         * (TCP segments fit the path MTU); drop them rather than let a piece through. */
        return (from_pod || to_pod) ? TC_ACT_SHOT : ZT_PASS;
    ihl = ip->ihl * 4;
    if (ihl < sizeof(*ip))
        return ZT_PASS;
    tcp = (void *)ip + ihl;
    if ((void *)(tcp + 1) > data_end)
        return ZT_PASS;

    tuple.ipv4.saddr = ip->saddr;
    tuple.ipv4.daddr = ip->daddr;
    tuple.ipv4.sport = tcp->source;
    tuple.ipv4.dport = tcp->dest;

    /* 1. an existing socket of this netns owns the packet */
    sk = (struct bpf_sock *)bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4),
                                               BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        if (sk->state != ZT_TCP_LISTEN) {
            err = bpf_sk_assign(skb, sk, 0);
            bpf_sk_release(sk);
            if (err)
                return ZT_PASS;
            zt_mark(skb);
            return TC_ACT_OK;
        }
        bpf_sk_release(sk);
    }

    /* 2. a captured flow without a socket: its listener. A SYN opens a new flow there; any
     * other packet is the listener's to judge: the ACK of a SYN cookie (the SYN queue
     * overflowed, so no request socket exists) completes the handshake, and anything else is
     * answered with a reset. No packet of a captured flow is ever routed as plain IP. */
    if (from_pod) {
        /* From an enrolled pod: the agent carries it out (with the pod's identity), even
         * to an enrolled pod on this node, whose inbound policy the agent then applies. */
        port = ZT_OUTBOUND_PORT;
    } else if (to_pod) {
        port = tcp->dest == bpf_htons(ZT_HBONE_PORT) ? ZT_INBOUND_PORT : ZT_PLAINTEXT_PORT;
    } else {
        return ZT_PASS;
    }

    tuple.ipv4.daddr = ZT_AGENT_IP;
    tuple.ipv4.dport = bpf_htons(port);
    sk = (struct bpf_sock *)bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4),
                                               BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return zt_refuse(skb, eth, ip, tcp, ihl);
    if (sk->state != ZT_TCP_LISTEN) {
        bpf_sk_release(sk);
        return zt_refuse(skb, eth, ip, tcp, ihl);
    }
    err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err)
        return TC_ACT_SHOT;
    zt_mark(skb);
    return TC_ACT_OK;
}
