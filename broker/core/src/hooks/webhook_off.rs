//! Stand-in for the webhook worker in a build without the `webhooks` feature: no HTTP client
//! is linked, and [`super::Hooks::new`] refuses a configuration with webhooks (naming the
//! field and the feature), so these types are never built — they are uninhabited.

use corvid_api::WebhookStatus;
use tokio_util::sync::CancellationToken;

/// A webhook's health; never built without the feature.
#[derive(Debug)]
pub enum Health {}

impl Health {
    /// The status for the admin API (never called: no value exists).
    pub(super) fn status(&self, _: u64, _: u64, _: u64, _: u64) -> WebhookStatus {
        match *self {}
    }
}

/// A webhook's worker; never built without the feature.
#[derive(Debug)]
pub(super) enum Worker {}

impl Worker {
    /// Posts the queue's events (never called: no value exists).
    pub(super) async fn run(self, _: CancellationToken) {
        match self {}
    }
}

#[cfg(test)]
mod tests {
    use super::super::{HookError, Hooks};
    use crate::config::WebhookConfig;
    use crate::metrics::Metrics;

    #[test]
    fn a_configured_webhook_is_refused_by_name() {
        let metrics = Metrics::new().expect("metrics");
        let none = Hooks::new(&[], "n1", &metrics).expect("no webhooks: nothing to refuse");
        assert!(!none.wants(crate::hooks::EventKind::ClientConnected));
        let err = Hooks::new(&[WebhookConfig::default()], "n1", &metrics).expect_err("refused");
        assert!(matches!(err, HookError::NotBuilt(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "webhooks: this broker was built without the `webhooks` feature"
        );
    }
}
