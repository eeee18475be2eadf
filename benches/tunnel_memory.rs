//! The core's memory as the tunnel table grows (issue 10, measure b, without sockets): live heap
//! bytes per held tunnel after set-ups (INVITE, 180, 200, ACK through the sans-IO core) at 0,
//! 50 000 and 100 000 tunnels held, transactions run to their end; and the tunnel table by
//! itself. Bytes are counted by an instrumented allocator (stats_alloc), not read from RSS
//! (the times printed are glibc's and not the measure: `cargo bench --bench held_tunnels`).
//!
//! `cargo bench --bench tunnel_memory [-- HELD_STEP PROBE]` (defaults 50000 5000).

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::alloc::System;
use std::time::Instant;

use common::{config, new_proxy, set_up, settle, step_and_probe};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn main() {
    let (step, probe) = step_and_probe();
    let mut proxy = new_proxy(config());
    let mut now = Instant::now();
    let mut n = 0u64;
    table_alone(step);
    let region = Region::new(GLOBAL);
    let mut base: Option<(u64, isize)> = None;
    println!("# heap of held tunnels through the sans-IO core: step {step}, probe {probe}");
    for round in 0..3 {
        let held = proxy.tunnel_count() as u64;
        let t0 = Instant::now();
        for _ in 0..probe {
            n += 1;
            set_up(&mut proxy, n, now);
        }
        let per_setup = t0.elapsed() / probe as u32;
        settle(&mut proxy, &mut now);
        let stats = region.change();
        let live = stats.bytes_allocated as isize - stats.bytes_deallocated as isize;
        let held_now = proxy.tunnel_count() as u64;
        let per_tunnel = match base {
            Some((h0, l0)) => format!("{:.0}", (live - l0) as f64 / (held_now - h0).max(1) as f64),
            None => "-".into(),
        };
        if base.is_none() {
            base = Some((held_now, live));
        }
        println!(
            "held={held:>7} us_per_setup_glibc={:>7.2} live_heap_mib={:>7.1} heap_bytes_per_held_tunnel={per_tunnel}",
            per_setup.as_secs_f64() * 1e6,
            live as f64 / (1 << 20) as f64
        );
        if round < 2 {
            for _ in 0..(step - probe) {
                n += 1;
                set_up(&mut proxy, n, now);
            }
            settle(&mut proxy, &mut now);
        }
    }
}

/// The tunnel table by itself: heap bytes per record, tunnels shaped like SIPp's.
fn table_alone(n: u64) {
    use gatehouse::tunnel::{Party, Tunnel, TunnelState, TunnelTable};
    let region = Region::new(GLOBAL);
    let mut table = TunnelTable::default();
    for i in 0..n {
        table.insert(Tunnel {
            call_id: format!("{i}-31337@127.0.0.1"),
            caller_tag: format!("31337SIPpTag00{i}"),
            callee_tag: Some(format!("31338SIPpTag01{i}")),
            identity: "trusted".into(),
            from: "sip:sipp@127.0.0.1".into(),
            to: "sip:vpn@org.example".into(),
            prefixes: "2001:db8:456:1::/64".into(),
            pubkey: String::new(),
            pskmth: "none".into(),
            created_unix: 1_800_000_000,
            state: TunnelState::Established,
            caller: Some(Party {
                contact: "sip:sipp@127.0.0.1:5080;transport=UDP".into(),
                transport: gatehouse_sip::flow::Transport::Udp,
                addr: "127.0.0.1:5080".parse().unwrap(),
                aor: "sip:sipp@127.0.0.1:5080".into(),
                tag: format!("31337SIPpTag00{i}"),
                route: String::new(),
            }),
            callee: Some(Party {
                contact: "sip:127.0.0.1:5070".into(),
                transport: gatehouse_sip::flow::Transport::Udp,
                addr: "127.0.0.1:5070".parse().unwrap(),
                aor: "sip:vpn@org.example".into(),
                tag: format!("31338SIPpTag01{i}"),
                route: String::new(),
            }),
        });
    }
    let _ = table.take_dirty();
    let stats = region.change();
    let live = stats.bytes_allocated as isize - stats.bytes_deallocated as isize;
    println!(
        "tunnel table alone: {n} records, {:.0} heap bytes per record",
        live as f64 / n as f64
    );
}
