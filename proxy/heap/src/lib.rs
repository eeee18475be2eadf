//! The process heap, kept warm.
//!
//! `gatehouse run` allocates with mimalloc (its binary declares the global allocator). Left to
//! its defaults, mimalloc gives a page back to the operating system 10 ms after its last block
//! is freed (100 ms for whole arena blocks), and takes it again when the heap grows. Each time,
//! the first write to that page is a page fault. On bare metal a fault costs about a
//! microsecond; on a virtual machine whose host backs guest memory lazily (this project's
//! machines, issue 20) one fault measured 3-4 ms of kernel time, and with one I/O loop every
//! message behind it waits that long. That was the whole of the loop's stalls over 2.5 ms at
//! 200 calls/s (docs/PERFORMANCE.md, "A warm heap").
//!
//! [`keep_warm`] does what Kamailio's fixed memory pools do: memory the process has touched
//! stays with it (no purge), and a reserve is touched once at start, before the first
//! message, so the working set of a steady load never faults. The price is that the resident
//! size stays at its high-water mark after a burst; the reserve is `[engine] memory_reserve`.
//!
//! This is the one crate of the workspace that contains `unsafe`: one call into the allocator's
//! option table, with no pointer argument (see [`keep_warm`]).

use libmimalloc_sys as ffi;

/// mimalloc 2's `mi_option_purge_delay` (its `mimalloc.h`, `mi_option_e`: the sixteenth
/// option). The sys crate exports no constant for it; the test `purge_delay_is_the_option_we_set`
/// checks the index against the documented default (10 ms).
const MI_OPTION_PURGE_DELAY: ffi::mi_option_t = 15;

/// What [`keep_warm`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Warmed {
    /// Bytes of heap written once and handed back to the allocator, which keeps them.
    pub reserved: usize,
}

/// Reserve blocks are written in pieces of this size (mimalloc serves them from its arenas,
/// the same memory later small blocks come from).
const PIECE: usize = 1 << 20;

/// Turns off returning freed memory to the operating system, then writes `reserve` bytes of
/// heap (rounded up to whole MiB) and frees them, so they are resident and reused by the
/// allocations that follow. Call once, at start, from the process whose global allocator is
/// [`mimalloc::MiMalloc`]; `reserve = 0` only turns purging off.
pub fn keep_warm(reserve: usize) -> Warmed {
    // SAFETY: `mi_option_set` writes one integer in mimalloc's option table (an atomic store in
    // mimalloc 2, safe from any thread at any time); it takes no pointer and no allocation can
    // be in flight through it. A purge delay of -1 is documented as "no purging at all".
    #[allow(unsafe_code)]
    unsafe {
        ffi::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
    }
    let pieces = reserve.div_ceil(PIECE);
    let mut held: Vec<Vec<u8>> = Vec::with_capacity(pieces);
    for _ in 0..pieces {
        // A non-zero fill: the allocator cannot hand out untouched zero pages for it.
        held.push(std::hint::black_box(vec![0xa5u8; PIECE]));
    }
    drop(std::hint::black_box(held));
    Warmed {
        reserved: pieces * PIECE,
    }
}

/// Whether freed memory is returned to the operating system (false after [`keep_warm`]).
pub fn purging() -> bool {
    // SAFETY: reads one integer from mimalloc's option table; no pointer argument.
    #[allow(unsafe_code)]
    let delay = unsafe { ffi::mi_option_get(MI_OPTION_PURGE_DELAY) };
    delay >= 0
}

/// Asks the allocator to give back now whatever it would give back (mimalloc's forced
/// collection): after [`keep_warm`], nothing. Used by the tests and by nothing on a hot path.
pub fn collect() {
    // SAFETY: `mi_collect` takes a flag and walks the calling thread's own heap.
    #[allow(unsafe_code)]
    unsafe {
        ffi::mi_collect(true);
    }
}
