//! Realm crossover, the I/O side (docs/realm-crossover.md): the relay client a foreign
//! gateway uses to reach a caller's home over HTTPS with its client certificate
//! ([`relay`]), the home's HTTPS service that authenticates its users for foreign gateways
//! ([`home`]), and the JSON the two exchange ([`wire`]). The protocol itself is sans-IO in
//! `gatehouse_auth::xover` (tokens, seal, keys) and `core::crossover` (parking, bounds).

// The I/O side: it reads the clock (deadlines, rates) and opens sockets, like `transport`.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod home;
pub mod relay;
pub mod wire;

use rustls::pki_types::CertificateDer;

/// The domains a certificate names as RFC 5922 would have them: its DNS subject alternative
/// names and the hosts of its `sip:` URI SANs, lower case; wildcards are never a domain.
pub fn certificate_domains(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, x)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x.subject_alternative_name() else {
        return Vec::new();
    };
    let mut out: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_ascii_lowercase()),
            GeneralName::URI(u) => u
                .strip_prefix("sip:")
                .filter(|h| !h.contains(['@', ';', ':', '?']))
                .map(str::to_ascii_lowercase),
            _ => None,
        })
        .filter(|d| !d.contains('*') && gatehouse_auth::xover::valid_realm(d))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether a (chain-verified) certificate names `realm` exactly (no wildcard): what a home's
/// server certificate must do, whatever name DNS led to.
pub fn names_exactly(cert: &CertificateDer<'_>, realm: &str) -> bool {
    certificate_domains(cert)
        .iter()
        .any(|d| d.eq_ignore_ascii_case(realm))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_home_certificate_must_name_the_realm_exactly() {
        assert!(names_exactly(
            &cert(&["partner.example"]),
            "partner.example"
        ));
        assert!(names_exactly(
            &cert(&["PARTNER.example", "x.example"]),
            "partner.example"
        ));
        // A wildcard that webpki would accept for the name is not the realm (RFC 5922 7.2).
        assert!(!names_exactly(&cert(&["*.example"]), "partner.example"));
        assert!(!names_exactly(
            &cert(&["home.partner.example"]),
            "partner.example"
        ));
        assert_eq!(
            certificate_domains(&cert(&["org.example", "*.org.example"])),
            vec!["org.example".to_owned()]
        );
    }
}
