//! The heap kept warm: after `keep_warm`, memory the process freed is not given back, so a
//! load that allocates again takes no page fault. One test, in order, since `keep_warm` is
//! process-wide and cannot be undone.

use gatehouse_heap::{collect, keep_warm, purging};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Minor page faults of the calling thread so far (`/proc/thread-self/stat`, field 10).
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("procfs");
    // The command name (field 2) is parenthesised and may contain spaces: count after it.
    let after = &stat[stat.rfind(')').expect("stat format") + 2..];
    after
        .split(' ')
        .nth(7)
        .and_then(|f| f.parse().ok())
        .expect("minflt field")
}

/// A burst of small allocations like a load's transactions (about 12 MiB), written, then
/// freed: the page faults it took.
fn burst() -> u64 {
    let before = minor_faults();
    let blocks: Vec<Box<[u8; 120]>> = (0..100_000u32).map(|i| Box::new([i as u8; 120])).collect();
    std::hint::black_box(&blocks);
    drop(blocks);
    minor_faults() - before
}

#[test]
fn freed_memory_stays_resident_once_kept_warm() {
    assert!(purging(), "mimalloc's default gives memory back");
    let first = burst();
    assert!(first > 0, "a first burst on fresh memory faults");
    // The default: freed memory is given back, so the same burst faults again.
    collect();
    let again = burst();
    assert!(again > 0, "memory given back is faulted in again ({again})");

    let warmed = keep_warm(32 << 20);
    assert_eq!(warmed.reserved, 32 << 20);
    assert!(!purging());
    collect();
    let warm = burst();
    // Nothing of the burst is new memory any more (a fault or two of allocator metadata at most).
    assert!(
        warm <= 2,
        "after keep_warm the burst took {warm} faults (first {first}, after a purge {again})"
    );
    collect();
    assert!(burst() <= 2, "a forced collection gives nothing back");
}
