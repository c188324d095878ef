//! etcd's `--auth-token jwt,...` tokens: signed JSON Web Tokens (ES256 or RS256) that every member
//! verifies with the public key, no state shared. The claims are etcd's: `username`,
//! `revision` (the auth revision at issue) and `exp` (Unix seconds).
//!
//! Keys are PEM files: the private key PKCS#8 (`openssl pkcs8 -topk8 -nocrypt`) or, for RSA,
//! PKCS#1; the public key an SPKI `PUBLIC KEY`. A member given only the public key verifies
//! tokens and issues none.

use std::path::Path;
use std::time::Duration;

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, SubjectPublicKeyInfoDer};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Es256,
    Rs256,
}

impl Alg {
    fn name(self) -> &'static str {
        match self {
            Alg::Es256 => "ES256",
            Alg::Rs256 => "RS256",
        }
    }
}

enum Signer {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

pub struct Jwt {
    alg: Alg,
    signer: Option<Signer>,
    /// The raw public key: an uncompressed P-256 point, or a PKCS#1 RSA public key.
    public: Vec<u8>,
    pub ttl: Duration,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt").field("alg", &self.alg).field("signs", &self.signer.is_some()).finish()
    }
}

static INSTALLED: std::sync::OnceLock<Jwt> = std::sync::OnceLock::new();

/// This member's `--auth-token jwt` keys, set once at start.
pub fn install(jwt: Jwt) {
    let _ = INSTALLED.set(jwt);
}

/// The installed keys, if the member runs with `--auth-token jwt`.
pub fn installed() -> Option<&'static Jwt> {
    INSTALLED.get()
}

/// The default lifetime of a JWT (etcd's).
pub const JWT_TTL_DEFAULT: Duration = Duration::from_secs(300);

fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn unb64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()
}

/// etcd's duration spelling in `ttl=` (`5m`, `300s`, `1h`).
fn parse_ttl(s: &str) -> Option<Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

impl Jwt {
    /// `--auth-token`: `simple` (`None`) or etcd's
    /// `jwt,pub-key=PATH,priv-key=PATH,sign-method=ES256|RS256[,ttl=5m]`.
    pub fn from_flag(spec: &str) -> Result<Option<Jwt>, String> {
        let mut parts = spec.split(',');
        match parts.next().map(str::trim) {
            Some("simple") if spec.trim() == "simple" => return Ok(None),
            Some("jwt") => {}
            _ => {
                return Err(format!(
                    "--auth-token {spec:?}: `simple`, or `jwt,pub-key=...,priv-key=...,sign-method=ES256|RS256`"
                ))
            }
        }
        let (mut public, mut private, mut alg, mut ttl) = (None, None, None, JWT_TTL_DEFAULT);
        for p in parts {
            let (k, v) = p.split_once('=').ok_or_else(|| format!("--auth-token: {p:?} is not key=value"))?;
            match k.trim() {
                "pub-key" => public = Some(v.trim().to_string()),
                "priv-key" => private = Some(v.trim().to_string()),
                "sign-method" => {
                    alg = Some(match v.trim() {
                        "ES256" => Alg::Es256,
                        "RS256" => Alg::Rs256,
                        other => return Err(format!("--auth-token: sign-method {other:?}: ES256 or RS256")),
                    })
                }
                "ttl" => {
                    ttl = parse_ttl(v.trim()).ok_or_else(|| format!("--auth-token: ttl {v:?}: like 300s, 5m, 1h"))?
                }
                other => return Err(format!("--auth-token: unknown option {other:?}")),
            }
        }
        let alg = alg.ok_or("--auth-token jwt needs sign-method=ES256|RS256")?;
        let public = public.ok_or("--auth-token jwt needs pub-key=PATH")?;
        Jwt::load(alg, Path::new(&public), private.as_deref().map(Path::new), ttl).map(Some)
    }

    pub fn load(alg: Alg, public: &Path, private: Option<&Path>, ttl: Duration) -> Result<Jwt, String> {
        let spki = SubjectPublicKeyInfoDer::from_pem_file(public)
            .map_err(|e| format!("--auth-token pub-key {}: {e}", public.display()))?;
        use x509_parser::prelude::FromDer;
        let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki.as_ref())
            .map_err(|e| format!("--auth-token pub-key {}: {e}", public.display()))?;
        let public_key = info.subject_public_key.data.to_vec();
        let signer = match private {
            None => None,
            Some(path) => {
                let bad = |e: &dyn std::fmt::Display| format!("--auth-token priv-key {}: {e}", path.display());
                let key = PrivateKeyDer::from_pem_file(path).map_err(|e| bad(&e))?;
                Some(match (alg, &key) {
                    (Alg::Es256, PrivateKeyDer::Pkcs8(k)) => Signer::Ec(
                        EcdsaKeyPair::from_pkcs8(
                            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                            k.secret_pkcs8_der(),
                            &SystemRandom::new(),
                        )
                        .map_err(|e| bad(&e))?,
                    ),
                    (Alg::Rs256, PrivateKeyDer::Pkcs8(k)) => {
                        Signer::Rsa(RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()).map_err(|e| bad(&e))?)
                    }
                    (Alg::Rs256, PrivateKeyDer::Pkcs1(k)) => {
                        Signer::Rsa(RsaKeyPair::from_der(k.secret_pkcs1_der()).map_err(|e| bad(&e))?)
                    }
                    _ => {
                        return Err(bad(
                            &"not a PKCS#8 key of the sign-method (convert: openssl pkcs8 -topk8 -nocrypt)",
                        ))
                    }
                })
            }
        };
        let own_public = match &signer {
            Some(Signer::Ec(k)) => Some(k.public_key().as_ref().to_vec()),
            Some(Signer::Rsa(k)) => Some(k.public().as_ref().to_vec()),
            None => None,
        };
        if own_public.is_some_and(|p| p != public_key) {
            return Err("--auth-token: priv-key and pub-key are not a pair".into());
        }
        Ok(Jwt { alg, signer, public: public_key, ttl })
    }

    /// Whether this member can issue tokens (it was given the private key).
    pub fn signs(&self) -> bool {
        self.signer.is_some()
    }

    /// A token for `user`, issued at auth revision `revision`, good until `exp_unix_s`.
    pub fn sign(&self, user: &str, revision: u64, exp_unix_s: u64) -> Option<String> {
        let header = format!(r#"{{"alg":"{}","typ":"JWT"}}"#, self.alg.name());
        let claims = serde_json::json!({"username": user, "revision": revision, "exp": exp_unix_s}).to_string();
        let msg = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
        let rng = SystemRandom::new();
        let sig = match self.signer.as_ref()? {
            Signer::Ec(k) => k.sign(&rng, msg.as_bytes()).ok()?.as_ref().to_vec(),
            Signer::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, msg.as_bytes(), &mut sig).ok()?;
                sig
            }
        };
        Some(format!("{msg}.{}", b64(&sig)))
    }

    /// The user a token names, if this key signed it with this method and it has not expired.
    pub fn verify(&self, token: &str, now_unix_s: u64) -> Option<String> {
        if token.len() > 8192 {
            return None;
        }
        let (msg, sig) = token.rsplit_once('.')?;
        let (header, claims) = msg.split_once('.')?;
        let header: serde_json::Value = serde_json::from_slice(&unb64(header)?).ok()?;
        // The method is ours, never the token's choice ("alg":"none" and key confusion).
        if header["alg"].as_str() != Some(self.alg.name()) {
            return None;
        }
        let sig = unb64(sig)?;
        let verifier: &dyn signature::VerificationAlgorithm = match self.alg {
            Alg::Es256 => &signature::ECDSA_P256_SHA256_FIXED,
            Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
        };
        signature::UnparsedPublicKey::new(verifier, &self.public).verify(msg.as_bytes(), &sig).ok()?;
        let claims: serde_json::Value = serde_json::from_slice(&unb64(claims)?).ok()?;
        let exp = claims["exp"].as_u64()?;
        if exp <= now_unix_s {
            return None;
        }
        claims["username"].as_str().filter(|u| !u.is_empty()).map(str::to_string)
    }

    /// Whether `token` is shaped like a JWT (three base64url parts, a JSON header).
    pub fn looks_like(token: &str) -> bool {
        token.starts_with("eyJ") && token.matches('.').count() == 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(dir: &Path, alg: &'static rcgen::SignatureAlgorithm) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let (public, private) = (dir.join("pub.pem"), dir.join("priv.pem"));
        std::fs::write(&public, key.public_key_pem()).unwrap();
        std::fs::write(&private, key.serialize_pem()).unwrap();
        (public, private)
    }

    #[test]
    fn tokens_verify_with_the_public_key_alone_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let (public, private) = keys(dir.path(), &rcgen::PKCS_ECDSA_P256_SHA256);
        let spec = format!("jwt,pub-key={},priv-key={},sign-method=ES256,ttl=5m", public.display(), private.display());
        let signer = Jwt::from_flag(&spec).unwrap().unwrap();
        assert_eq!(signer.ttl, Duration::from_secs(300));
        let t = signer.sign("alice", 7, 1_000).unwrap();
        assert!(Jwt::looks_like(&t), "{t}");
        let verifier = Jwt::from_flag(&format!("jwt,pub-key={},sign-method=ES256", public.display())).unwrap().unwrap();
        assert!(!verifier.signs());
        assert_eq!(verifier.verify(&t, 999), Some("alice".into()));
        assert_eq!(verifier.verify(&t, 1_000), None, "expired");
        // Claims changed, signature kept; "alg":"none"; another key's token.
        let (h, rest) = t.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let forged = format!("{h}.{}.{sig}", b64(br#"{"username":"root","revision":7,"exp":1000}"#));
        assert_eq!(verifier.verify(&forged, 0), None);
        let none = format!("{}.{}.", b64(br#"{"alg":"none"}"#), b64(br#"{"username":"root","exp":9999999999}"#));
        assert_eq!(verifier.verify(&none, 0), None);
        let other_dir = tempfile::tempdir().unwrap();
        let (op, ok) = keys(other_dir.path(), &rcgen::PKCS_ECDSA_P256_SHA256);
        let other = Jwt::load(Alg::Es256, &op, Some(&ok), JWT_TTL_DEFAULT).unwrap();
        assert_eq!(verifier.verify(&other.sign("root", 7, 1_000).unwrap(), 0), None);
        // Mismatched pair, bad flags.
        assert!(Jwt::load(Alg::Es256, &public, Some(&ok), JWT_TTL_DEFAULT).unwrap_err().contains("not a pair"));
        assert!(Jwt::from_flag("simple").unwrap().is_none());
        for bad in ["jwt", "jwt,sign-method=HS256", "token", "jwt,pub-key=/nope,sign-method=ES256", "simple,x"] {
            assert!(Jwt::from_flag(bad).is_err(), "{bad}");
        }
    }
}
