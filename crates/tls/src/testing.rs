//! Certificates made on the spot, for tests (feature `testing`): a CA, and certificates it
//! signs for loopback (SAN `127.0.0.1` and `localhost`), good for servers and clients alike.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, written as PEM files.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).expect("self-signed CA");
        Ca { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Write the CA's certificate to `dir/NAME.pem`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, self.pem()).expect("write CA");
        path
    }

    /// A certificate with common name `cn` for loopback, as PEM (certificate, key).
    pub fn issue(&self, cn: &str) -> (String, String) {
        self.issue_for(cn, &["localhost"], &[[127, 0, 0, 1].into()])
    }

    /// A certificate with common name `cn` and these subject alternative names.
    pub fn issue_for(&self, cn: &str, dns: &[&str], ips: &[std::net::IpAddr]) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).expect("params");
        params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("signed");
        (cert.pem(), key.serialize_pem())
    }

    /// `issue`, written to `dir/NAME.pem` and `dir/NAME.key`.
    pub fn issue_files(&self, dir: &Path, name: &str, cn: &str) -> Issued {
        let (cert, key) = self.issue(cn);
        Self::write_pair(dir, name, cert, key)
    }

    /// `issue_for`, written to `dir/NAME.pem` and `dir/NAME.key`.
    pub fn issue_files_for(&self, dir: &Path, name: &str, cn: &str, dns: &[&str]) -> Issued {
        let (cert, key) = self.issue_for(cn, dns, &[]);
        Self::write_pair(dir, name, cert, key)
    }

    fn write_pair(dir: &Path, name: &str, cert: String, key: String) -> Issued {
        let issued = Issued { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) };
        std::fs::write(&issued.cert, cert).expect("write cert");
        std::fs::write(&issued.key, key).expect("write key");
        issued
    }
}

/// A P-256 key pair for `--auth-token jwt,...,sign-method=ES256`, written as `dir/jwt.pub.pem`
/// (SPKI) and `dir/jwt.pem` (PKCS#8): (public, private).
pub fn jwt_keys(dir: &Path) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let (public, private) = (dir.join("jwt.pub.pem"), dir.join("jwt.pem"));
    std::fs::write(&public, key.public_key_pem()).expect("write public key");
    std::fs::write(&private, key.serialize_pem()).expect("write private key");
    (public, private)
}
