//! SASL for SIP and HTTP. Not implemented yet: the SASL issue (#3) fills this crate.
