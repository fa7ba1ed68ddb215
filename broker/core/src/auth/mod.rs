//! Client authentication on CONNECT: the client-id allow list, a users file of salted
//! password hashes, an optional HTTP backend, then the anonymous switch — tried in that
//! order, each source either deciding or passing to the next.
//!
//! A decision may carry extra ACL rules (the HTTP backend can send them per client); they go
//! before the configured rules for that connection.

#[cfg(feature = "http-auth")]
pub mod http;
#[cfg(not(feature = "http-auth"))]
#[path = "http_off.rs"]
pub mod http;
pub mod users;

use std::net::SocketAddr;

use crate::acl::Rule;
use crate::config::AuthConfig;
use crate::metrics::AuthCounters;

/// What the broker knows about a connecting client.
#[derive(Debug, Clone)]
pub struct ConnectCtx<'a> {
    /// Client id as sent (may be empty: the broker assigns one).
    pub client_id: &'a str,
    /// User name.
    pub username: Option<&'a str>,
    /// Password bytes.
    pub password: Option<&'a [u8]>,
    /// Client address.
    pub peer: SocketAddr,
    /// `3.1.1` or `5.0`.
    pub protocol: &'static str,
}

/// Why a client is refused; each maps to a CONNACK code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong user name or password (3.1.1 0x04, 5.0 0x86).
    BadCredentials,
    /// Not allowed to connect (3.1.1 0x05, 5.0 0x87).
    NotAuthorized,
    /// Client id not on the allow list (3.1.1 0x02, 5.0 0x85).
    ClientIdNotAllowed,
    /// The HTTP backend could not be asked and the policy is fail-closed (0x05 / 0x87).
    BackendUnavailable,
}

/// Which source admitted a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The users file.
    UsersFile,
    /// The HTTP backend.
    Http,
    /// No source decided and anonymous access is on.
    Anonymous,
}

/// The outcome of authenticating one CONNECT.
#[derive(Debug, Clone)]
pub enum AuthDecision {
    /// Admitted, with extra ACL rules for this connection.
    Allow {
        /// Who decided.
        source: Source,
        /// Rules from the backend, checked before the configured ones.
        acl: Vec<Rule>,
    },
    /// Refused.
    Deny(Refusal),
}

/// One source's verdict.
#[derive(Debug, Clone)]
pub(crate) enum Verdict {
    Allow(Vec<Rule>),
    Deny(Refusal),
    /// This source does not know the client: ask the next one.
    Ignore,
}

/// Why authentication could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The HTTP client could not be built.
    #[error("auth.http: {0}")]
    Http(String),
    /// The configuration asks for something this build left out.
    #[error(transparent)]
    NotBuilt(#[from] crate::config::NotBuilt),
}

/// The chain of authentication sources.
#[derive(Debug)]
pub struct Authenticator {
    allow_anonymous: bool,
    client_ids: Vec<String>,
    users: Option<users::UsersFile>,
    http: Option<http::HttpBackend>,
    counters: AuthCounters,
}

impl Authenticator {
    /// Builds the chain from the `auth` section.
    pub fn new(cfg: &AuthConfig, counters: AuthCounters) -> Result<Self, AuthError> {
        Ok(Authenticator {
            allow_anonymous: cfg.allow_anonymous,
            client_ids: cfg.client_ids.clone(),
            users: cfg.users_file.clone().map(users::UsersFile::new),
            http: cfg.http.as_ref().map(http::HttpBackend::new).transpose()?,
            counters,
        })
    }

    /// Caps the password hashes the users file verifies at once (`limits.max_concurrent_hashes`).
    pub fn with_max_concurrent_hashes(mut self, n: usize) -> Self {
        if let Some(u) = self.users.take() {
            self.users = Some(u.with_max_concurrent_hashes(n));
        }
        self
    }

    /// Whether every client is admitted without looking at it (the default configuration).
    pub fn is_open(&self) -> bool {
        self.allow_anonymous
            && self.client_ids.is_empty()
            && self.users.is_none()
            && self.http.is_none()
    }

    /// Decides one CONNECT, counting the outcome.
    pub async fn authenticate(&self, ctx: &ConnectCtx<'_>) -> AuthDecision {
        let d = self.decide(ctx).await;
        let c = &self.counters;
        match &d {
            AuthDecision::Allow { source, .. } => match source {
                Source::UsersFile => c.success_users_file.inc(),
                Source::Http => c.success_http.inc(),
                Source::Anonymous => c.success_anonymous.inc(),
            },
            AuthDecision::Deny(r) => match r {
                Refusal::BadCredentials => c.bad_credentials.inc(),
                Refusal::NotAuthorized => c.not_authorized.inc(),
                Refusal::ClientIdNotAllowed => c.client_id_not_allowed.inc(),
                Refusal::BackendUnavailable => c.backend_error.inc(),
            },
        }
        d
    }

    async fn decide(&self, ctx: &ConnectCtx<'_>) -> AuthDecision {
        if !self.client_ids.is_empty() && !self.client_ids.iter().any(|c| c == ctx.client_id) {
            return AuthDecision::Deny(Refusal::ClientIdNotAllowed);
        }
        if let Some(users) = &self.users {
            match users.verify(ctx.username, ctx.password).await {
                Verdict::Allow(acl) => {
                    return AuthDecision::Allow {
                        source: Source::UsersFile,
                        acl,
                    }
                }
                Verdict::Deny(r) => return AuthDecision::Deny(r),
                Verdict::Ignore => {}
            }
        }
        if let Some(http) = &self.http {
            match http.ask(ctx).await {
                Ok(Verdict::Allow(acl)) => {
                    return AuthDecision::Allow {
                        source: Source::Http,
                        acl,
                    }
                }
                Ok(Verdict::Deny(r)) => return AuthDecision::Deny(r),
                Ok(Verdict::Ignore) => {}
                Err(e) if http.fail_open() => {
                    tracing::warn!(client_id = ctx.client_id, error = %e, "auth backend unavailable; admitting (fail_open)");
                    self.counters.backend_error.inc();
                    return AuthDecision::Allow {
                        source: Source::Http,
                        acl: Vec::new(),
                    };
                }
                Err(e) => {
                    tracing::warn!(client_id = ctx.client_id, error = %e, "auth backend unavailable; refusing");
                    return AuthDecision::Deny(Refusal::BackendUnavailable);
                }
            }
        }
        if self.allow_anonymous {
            AuthDecision::Allow {
                source: Source::Anonymous,
                acl: Vec::new(),
            }
        } else if ctx.username.is_some() {
            AuthDecision::Deny(Refusal::BadCredentials)
        } else {
            AuthDecision::Deny(Refusal::NotAuthorized)
        }
    }
}
