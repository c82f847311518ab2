//! One ACME order, from new-order to the certificate chain.

use super::challenge::Challenges;
use crate::config::AcmeChallenge;
use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder,
    OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use std::time::Duration;

/// A certificate fresh from the CA.
pub struct Issued {
    /// Leaf first, then the intermediates.
    pub chain_pem: String,
    pub key_pem: String,
}

/// Why an order failed.
#[derive(Debug)]
pub struct OrderError {
    pub message: String,
    /// The CA could not validate a challenge: the other challenge type may work.
    pub challenge_failed: bool,
    /// The CA refused the `replaces` field (ARI): retry without it.
    pub replaces_refused: bool,
}

impl OrderError {
    fn other(message: impl Into<String>) -> OrderError {
        OrderError {
            message: message.into(),
            challenge_failed: false,
            replaces_refused: false,
        }
    }
}

impl From<instant_acme::Error> for OrderError {
    fn from(e: instant_acme::Error) -> OrderError {
        let replaces_refused = match &e {
            instant_acme::Error::Api(p) => p
                .r#type
                .as_deref()
                .is_some_and(|t| t.ends_with(":alreadyReplaced") || t.ends_with(":conflict")),
            instant_acme::Error::Unsupported(_) => true,
            _ => false,
        };
        OrderError {
            message: e.to_string(),
            challenge_failed: false,
            replaces_refused,
        }
    }
}

impl std::fmt::Display for OrderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Challenge responses published for this order, withdrawn when it ends however it ends.
struct Published<'a> {
    challenges: &'a Challenges,
    http: Vec<String>,
    alpn: Vec<String>,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for token in &self.http {
            self.challenges.remove_http(token);
        }
        for name in &self.alpn {
            self.challenges.remove_alpn(name);
        }
    }
}

fn acme_type(c: AcmeChallenge) -> ChallengeType {
    match c {
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        AcmeChallenge::Http01 => ChallengeType::Http01,
    }
}

/// Validation and issuance are polled at most this long.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(120));

/// Places an order for `names`, answers its challenges with `challenge` (or the other type
/// when the CA does not offer it), and returns the certificate with a new ECDSA P-256 key.
pub async fn issue(
    account: &Account,
    names: &[String],
    challenge: AcmeChallenge,
    challenges: &Challenges,
    replaces: Option<CertificateIdentifier<'static>>,
) -> Result<Issued, OrderError> {
    let identifiers: Vec<Identifier> = names.iter().cloned().map(Identifier::Dns).collect();
    let mut new_order = NewOrder::new(&identifiers);
    if let Some(id) = replaces {
        new_order = new_order.replaces(id);
    }
    let mut order = account.new_order(&new_order).await?;
    tracing::info!(names = ?names, order = %order.url(), "ACME order placed");

    let mut published = Published {
        challenges,
        http: Vec::new(),
        alpn: Vec::new(),
    };
    let preferred = acme_type(challenge);
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz?;
        let name = authz.identifier().to_string();
        match authz.status {
            AuthorizationStatus::Pending => {}
            // Reused from an earlier order: nothing to prove.
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(OrderError::other(format!(
                    "the authorization for {name} is {other:?}"
                )));
            }
        }
        let offered = |t: &ChallengeType| authz.challenges.iter().any(|c| c.r#type == *t);
        let kind = if offered(&preferred) {
            preferred.clone()
        } else {
            let other = match challenge {
                AcmeChallenge::TlsAlpn01 => ChallengeType::Http01,
                AcmeChallenge::Http01 => ChallengeType::TlsAlpn01,
            };
            if !offered(&other) {
                return Err(OrderError::other(format!(
                    "the CA offers neither tls-alpn-01 nor http-01 for {name}"
                )));
            }
            other
        };
        let Some(mut handle) = authz.challenge(kind.clone()) else {
            return Err(OrderError::other(format!(
                "no {kind:?} challenge for {name}"
            )));
        };
        let key_auth = handle.key_authorization();
        let written = if kind == ChallengeType::Http01 {
            published.http.push(handle.token.clone());
            challenges.publish_http(&handle.token, key_auth.as_str())
        } else {
            published.alpn.push(name.clone());
            challenges.publish_alpn(&name, key_auth.digest().as_ref())
        };
        written.map_err(|e| OrderError::other(format!("cannot publish the challenge: {e}")))?;
        tracing::debug!(name = %name, challenge = ?kind, "challenge published");
        handle.set_ready().await?;
    }

    let ready = order.poll_ready(&POLL).await;
    if !matches!(ready, Ok(OrderStatus::Ready)) {
        // Say why: each challenge that failed has its own error.
        let mut reasons = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(Ok(mut authz)) = authorizations.next().await {
            let name = authz.identifier().to_string();
            if let Ok(state) = authz.refresh().await {
                for c in &state.challenges {
                    if let Some(p) = &c.error {
                        reasons.push(format!("{name} ({:?}): {p}", c.r#type));
                    }
                }
            }
        }
        if !reasons.is_empty() {
            return Err(OrderError {
                message: format!("validation failed: {}", reasons.join("; ")),
                challenge_failed: true,
                replaces_refused: false,
            });
        }
        return Err(match ready {
            Err(e) => e.into(),
            Ok(status) => OrderError::other(format!("the order became {status:?}")),
        });
    }
    drop(published);

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| OrderError::other(e.to_string()))?;
    let mut params =
        CertificateParams::new(names.to_vec()).map_err(|e| OrderError::other(e.to_string()))?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| OrderError::other(e.to_string()))?;
    order.finalize_csr(csr.der()).await?;
    let chain_pem = order.poll_certificate(&POLL).await?;
    Ok(Issued {
        chain_pem,
        key_pem: key.serialize_pem(),
    })
}
