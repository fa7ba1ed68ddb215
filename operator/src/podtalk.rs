//! Talking to broker pods through their admin API (evacuate, evacuation progress, cluster view,
//! rebalance).
//! Behind a small trait so the reconcile logic can be exercised without real pods; the real
//! implementation goes through the API server's pod proxy, which works both in-cluster and from a
//! laptop with a kubeconfig.
//!
//! Every call is bounded by [`ADMIN_CALL_TIMEOUT`] (see [`bounded`]): the pod proxy waits as long
//! as the pod does, and one broken pod must never hold up a reconcile of the whole cluster.
//!
//! The answers are the `corvid-api` types the broker writes them with, so a member state (such
//! as `dead`) cannot be known to the broker and unknown here.

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;

use corvid_crds::ADMIN_PORT;

// The admin API's answers, re-exported for the operator's callers and mocks.
pub use corvid_api::{ClusterView, EvacuationState, EvacuationStatus, Member, MemberState};

/// Failure of one admin call.
#[derive(Debug, thiserror::Error)]
pub enum PodTalkError {
    /// The request could not be built (invalid pod or namespace name).
    #[error("building request for pod {pod}: {message}")]
    Request {
        /// Pod name.
        pod: String,
        /// What was wrong.
        message: String,
    },
    /// The API server or the broker answered with an error, or nobody answered.
    #[error("pod {pod}: {source}")]
    Call {
        /// Pod name.
        pod: String,
        /// Underlying error.
        #[source]
        source: kube::Error,
    },
    /// The pod did not answer within [`ADMIN_CALL_TIMEOUT`].
    #[error("pod {pod} did not answer within {}s", .after.as_secs())]
    Timeout {
        /// Pod name.
        pod: String,
        /// How long the operator waited.
        after: Duration,
    },
}

/// How long one admin call may take. A healthy broker answers in milliseconds even through the
/// API server's pod proxy; a pod that is starting, crash-looping or gone either refuses at once
/// or never answers, and the reconcile must go on without it.
pub const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(4);

/// Runs one admin call to `pod` under [`ADMIN_CALL_TIMEOUT`]. Applied where the operator makes
/// the call, so every [`BrokerAdmin`] implementation is bounded the same way.
pub async fn bounded<T>(
    pod: &str,
    call: impl Future<Output = Result<T, PodTalkError>>,
) -> Result<T, PodTalkError> {
    match tokio::time::timeout(ADMIN_CALL_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(PodTalkError::Timeout {
            pod: pod.to_string(),
            after: ADMIN_CALL_TIMEOUT,
        }),
    }
}

/// The admin calls the operator makes.
pub trait BrokerAdmin: Send + Sync {
    /// `POST /api/v1/evacuate` on `pod`, moving clients away at `rate` per second; with `uid`,
    /// only the instance of the pod with that UID accepts (a replacement answers 409).
    fn evacuate<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a str,
        uid: Option<&'a str>,
        rate: i32,
    ) -> BoxFuture<'a, Result<(), PodTalkError>>;
    /// `GET /api/v1/evacuate` on `pod`.
    fn evacuation<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a str,
    ) -> BoxFuture<'a, Result<EvacuationStatus, PodTalkError>>;
    /// `GET /api/v1/cluster` on `pod`.
    fn cluster<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a str,
    ) -> BoxFuture<'a, Result<ClusterView, PodTalkError>>;
    /// `POST /api/v1/rebalance?rate=N` on `pod`: one balance check now, shedding at most
    /// `rate` connections per second towards less-loaded members.
    fn rebalance<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a str,
        rate: i32,
    ) -> BoxFuture<'a, Result<(), PodTalkError>>;
}

/// Admin calls through the API server's pod proxy
/// (`/api/v1/namespaces/NS/pods/POD:18083/proxy/...`; needs `pods/proxy` get and create).
/// Each call carries the cluster's admin token in [`ADMIN_TOKEN_HEADER`]: the API server strips
/// `Authorization` before proxying.
#[derive(Clone)]
pub struct ApiServerProxy {
    client: kube::Client,
}

/// The header the broker accepts its admin token in when `Authorization` cannot carry it.
pub const ADMIN_TOKEN_HEADER: &str = "x-corvid-admin-token";

/// A spec rate as the broker's: at least 1 (the CRD's minimum; kept for objects admitted
/// without it).
fn positive(rate: i32) -> u32 {
    u32::try_from(rate.max(1)).unwrap_or(1)
}

impl ApiServerProxy {
    /// Uses `client` for every call.
    pub fn new(client: kube::Client) -> Self {
        ApiServerProxy { client }
    }

    /// The admin token of the cluster `pod` belongs to, read from its generated Secret (read on
    /// each call, so a rotated token applies at once); `None` while the Secret does not exist.
    async fn token(&self, namespace: &str, pod: &str) -> Option<String> {
        use k8s_openapi::api::core::v1::Secret;
        let names = crate::build::Names::of_pod(namespace, pod)?;
        let api: kube::Api<Secret> = kube::Api::namespaced(self.client.clone(), namespace);
        let secret = match api.get_opt(&names.admin_token_secret()).await {
            Ok(s) => s?,
            Err(e) => {
                tracing::warn!(%pod, error = %e, "cannot read the admin token Secret");
                return None;
            }
        };
        let bytes = secret
            .data?
            .remove(crate::build::config::ADMIN_TOKEN_KEY)?
            .0;
        String::from_utf8(bytes).ok().map(|t| t.trim().to_string())
    }

    fn request(
        method: http::Method,
        namespace: &str,
        pod: &str,
        path: &str,
        token: Option<&str>,
    ) -> Result<http::Request<Vec<u8>>, PodTalkError> {
        let uri = format!("/api/v1/namespaces/{namespace}/pods/{pod}:{ADMIN_PORT}/proxy{path}");
        let mut req = http::Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(ADMIN_TOKEN_HEADER, t);
        }
        req.body(Vec::new()).map_err(|e| PodTalkError::Request {
            pod: pod.to_string(),
            message: e.to_string(),
        })
    }
}

impl ApiServerProxy {
    /// `POST /api/v1/<action>?<query>` on one pod. The broker reads its options from the query
    /// string (a JSON body is ignored), so the body is empty.
    async fn post_rate(
        &self,
        namespace: &str,
        pod: &str,
        action: &str,
        query: String,
    ) -> Result<(), PodTalkError> {
        let path = format!("/api/v1/{action}?{query}");
        let token = self.token(namespace, pod).await;
        let req = Self::request(http::Method::POST, namespace, pod, &path, token.as_deref())?;
        self.client
            .request_text(req)
            .await
            .map_err(|source| PodTalkError::Call {
                pod: pod.to_string(),
                source,
            })?;
        Ok(())
    }

    /// `GET <path>` on one pod, its JSON answer decoded as `T`.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        namespace: &str,
        pod: &str,
        path: &str,
    ) -> Result<T, PodTalkError> {
        let token = self.token(namespace, pod).await;
        let req = Self::request(http::Method::GET, namespace, pod, path, token.as_deref())?;
        self.client
            .request(req)
            .await
            .map_err(|source| PodTalkError::Call {
                pod: pod.to_string(),
                source,
            })
    }
}

impl BrokerAdmin for ApiServerProxy {
    fn rebalance<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a str,
        rate: i32,
    ) -> BoxFuture<'a, Result<(), PodTalkError>> {
        Box::pin(
            self.post_rate(
                namespace,
                pod,
                "rebalance",
                corvid_api::RebalanceOptions {
                    rate: Some(positive(rate)),
                }
                .query(),
            ),
        )
    }

    fn evacuate<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a str,
        uid: Option<&'a str>,
        rate: i32,
    ) -> BoxFuture<'a, Result<(), PodTalkError>> {
        Box::pin(
            self.post_rate(
                namespace,
                pod,
                "evacuate",
                corvid_api::EvacuateOptions {
                    rate: Some(positive(rate)),
                    server_reference: None,
                    pod_uid: uid.map(str::to_string),
                }
                .query(),
            ),
        )
    }

    fn evacuation<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a str,
    ) -> BoxFuture<'a, Result<EvacuationStatus, PodTalkError>> {
        Box::pin(self.get_json(namespace, pod, "/api/v1/evacuate"))
    }

    fn cluster<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a str,
    ) -> BoxFuture<'a, Result<ClusterView, PodTalkError>> {
        Box::pin(self.get_json(namespace, pod, "/api/v1/cluster"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_json_shapes_parse() {
        let e: EvacuationStatus = serde_json::from_str(
            r#"{"state":"running","remaining_clients":3,"remaining_sessions":1}"#,
        )
        .expect("evacuate");
        assert_eq!(e.state, EvacuationState::Running);
        // Every state the broker sends (broker/cluster/src/lib.rs `members`), plus one it may send
        // some day.
        let c: ClusterView = serde_json::from_str(
            r#"{"node":"demo-0","members":[
                {"name":"demo-0","state":"self","routes":4},
                {"name":"demo-1","state":"ready","routes":2},
                {"name":"demo-2","state":"dead","routes":0},
                {"name":"demo-3","state":"joining"},
                {"name":"demo-4","state":"evacuating","routes":1},
                {"name":"demo-5","state":"quarantined"}]}"#,
        )
        .expect("cluster");
        assert_eq!(c.members[2].state, MemberState::Dead);
        assert_eq!(c.members[5].state, MemberState::Unknown);
        assert!(c.joined("demo-0"), "the answering node");
        assert!(c.joined("demo-1"));
        assert!(!c.joined("demo-2"), "a dead member is not joined");
        assert!(!c.joined("demo-3"), "joining is not joined yet");
        assert!(c.joined("demo-4"), "evacuating is still a member");
        assert!(
            !c.joined("demo-5"),
            "an unknown state is never counted as joined"
        );
        assert!(!c.joined("demo-9"), "absent is not joined");
    }

    #[test]
    fn a_restarted_pod_listed_dead_and_ready_is_joined() {
        let c: ClusterView = serde_json::from_str(
            r#"{"node":"demo-0","members":[{"name":"demo-2","state":"dead"},{"name":"demo-2","state":"ready"}]}"#,
        )
        .expect("cluster");
        assert!(c.joined("demo-2"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_that_never_answers_times_out() {
        let started = tokio::time::Instant::now();
        let result: Result<(), PodTalkError> = bounded("demo-2", futures::future::pending()).await;
        assert!(
            matches!(&result, Err(PodTalkError::Timeout { pod, .. }) if pod == "demo-2"),
            "{result:?}"
        );
        assert_eq!(started.elapsed(), ADMIN_CALL_TIMEOUT);
        let answered = bounded("demo-0", async { Ok(7) }).await;
        assert_eq!(answered.ok(), Some(7));
    }

    #[test]
    fn proxy_path_targets_the_admin_port() {
        let req = ApiServerProxy::request(
            http::Method::POST,
            "mqtt",
            "demo-2",
            "/api/v1/evacuate",
            Some("t0ken"),
        )
        .expect("request");
        assert_eq!(
            req.headers().get(ADMIN_TOKEN_HEADER).map(|v| v.as_bytes()),
            Some(&b"t0ken"[..]),
            "the token travels in the header the pod proxy forwards"
        );
        assert_eq!(
            req.uri().path(),
            "/api/v1/namespaces/mqtt/pods/demo-2:18083/proxy/api/v1/evacuate"
        );
        assert_eq!(req.method(), http::Method::POST);
        let req = ApiServerProxy::request(
            http::Method::POST,
            "mqtt",
            "demo-0",
            "/api/v1/rebalance?rate=100",
            None,
        )
        .expect("request");
        assert_eq!(
            req.uri().path_and_query().map(|p| p.as_str()),
            Some("/api/v1/namespaces/mqtt/pods/demo-0:18083/proxy/api/v1/rebalance?rate=100")
        );
    }
}
