//! Tunnel policy. Not implemented yet: the tunnels issue (#4) fills this crate.
