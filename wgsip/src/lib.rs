//! wgsip endpoint and caller. Not implemented yet: issue #5 fills this crate.
