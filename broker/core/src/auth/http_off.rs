//! Stand-in for the HTTP authentication backend in a build without the `http-auth` feature:
//! no HTTP client is linked, and a configuration with `auth.http` is refused at start, naming
//! the field and the feature, so the backend is never built — it is uninhabited.

use super::{AuthError, ConnectCtx, Verdict};
use crate::config::HttpAuthConfig;

/// Why the backend could not answer; never produced without the feature.
#[derive(Debug)]
pub enum BackendError {}

impl std::fmt::Display for BackendError {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {}
    }
}

impl std::error::Error for BackendError {}

/// The HTTP backend; never built without the feature.
#[derive(Debug)]
pub enum HttpBackend {}

impl HttpBackend {
    /// Refuses: this build has no HTTP client for the backend.
    pub fn new(_: &HttpAuthConfig) -> Result<Self, AuthError> {
        Err(AuthError::NotBuilt(crate::config::NotBuilt {
            field: "auth.http",
            feature: "http-auth",
        }))
    }

    /// Whether an unreachable backend admits clients (never called: no value exists).
    pub fn fail_open(&self) -> bool {
        match *self {}
    }

    /// Asks the backend (never called: no value exists).
    pub(crate) async fn ask(&self, _: &ConnectCtx<'_>) -> Result<Verdict, BackendError> {
        match *self {}
    }
}

#[cfg(test)]
mod tests {
    use super::super::{AuthError, Authenticator};
    use crate::config::{AuthConfig, HttpAuthConfig};
    use crate::metrics::Metrics;

    #[test]
    fn a_configured_backend_is_refused_by_name() {
        let metrics = Metrics::new().expect("metrics");
        let cfg = AuthConfig {
            http: Some(HttpAuthConfig::default()),
            ..AuthConfig::default()
        };
        let err = Authenticator::new(&cfg, metrics.auth.clone()).expect_err("refused");
        assert!(matches!(err, AuthError::NotBuilt(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "auth.http: this broker was built without the `http-auth` feature"
        );
        assert!(Authenticator::new(&AuthConfig::default(), metrics.auth.clone()).is_ok());
    }
}
