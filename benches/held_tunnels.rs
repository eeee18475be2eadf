//! The core's time as the tunnel table grows (issue 10, measure b, without sockets): µs per
//! tunnel set-up (INVITE, 180, 200, ACK through the sans-IO core) at 0, 50 000 and 100 000
//! tunnels held, with the binary's allocator (mimalloc; under glibc's the time grew with the
//! heap, not with the core's work). Transactions run to their end between probes. Heap bytes
//! per held tunnel: `cargo bench --bench tunnel_memory`.
//!
//! `cargo bench --bench held_tunnels [-- HELD_STEP PROBE]` (defaults 50000 5000).

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::time::Instant;

use common::{config, new_proxy, set_up, settle, step_and_probe};
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let (step, probe) = step_and_probe();
    let mut proxy = new_proxy(config());
    let mut now = Instant::now();
    let mut n = 0u64;
    println!("# held tunnels through the sans-IO core: step {step}, probe {probe}");
    for round in 0..3 {
        let held = proxy.tunnel_count() as u64;
        let t0 = Instant::now();
        for _ in 0..probe {
            n += 1;
            set_up(&mut proxy, n, now);
        }
        let per_setup = t0.elapsed() / probe as u32;
        settle(&mut proxy, &mut now);
        println!(
            "held={held:>7} us_per_setup={:>7.2}",
            per_setup.as_secs_f64() * 1e6
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
