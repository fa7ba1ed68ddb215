//! Client authentication and topic ACLs, rendered into the broker's `auth` and `acl` sections.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Who may connect.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Allow clients that send no username. Unset: allowed only when neither `usersSecret` nor
    /// `http` is configured. A LoadBalancer or NodePort Service without `usersSecret` or `http`
    /// needs it set to `true` on purpose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_anonymous: Option<bool>,
    /// Users file from a Secret (one user:password-hash per line), mounted read-only into the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users_secret: Option<SecretKeyRef>,
    /// When not empty, only these client ids may connect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_ids: Vec<String>,
    /// An HTTP backend asked to authenticate every connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpAuth>,
}

impl AuthSpec {
    /// Whether clients without a username are let in: `allowAnonymous` when set, otherwise only
    /// when no authentication source (users Secret, HTTP backend) is configured.
    pub fn anonymous_allowed(&self) -> bool {
        self.allow_anonymous
            .unwrap_or(self.users_secret.is_none() && self.http.is_none())
    }
}

/// A key inside a Secret in the cluster's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    pub name: String,
    /// Key inside the Secret.
    #[serde(default = "default_users_key")]
    pub key: String,
}

fn default_users_key() -> String {
    "users".to_string()
}

/// HTTP authentication backend.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.url.startsWith('http://') || self.url.startsWith('https://')")
    .message("auth.http.url must start with http:// or https://"))]
pub struct HttpAuth {
    /// URL that receives a POST per connect; 200 allows, anything else denies.
    #[schemars(length(max = 2048))]
    pub url: String,
    /// Request timeout in milliseconds.
    #[serde(default = "default_http_timeout_ms")]
    pub timeout_ms: i64,
}

fn default_http_timeout_ms() -> i64 {
    crate::broker_default(corvid_config::HttpAuthConfig::default().timeout_ms)
}

/// Topic access control.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AclSpec {
    /// Decision when no rule matches: allow or deny.
    #[serde(default)]
    pub no_match: AclPermission,
    /// Rules evaluated in order; the first match decides (at most 1000).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub rules: Vec<AclRule>,
}

/// allow or deny.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[serde(rename_all = "snake_case")]
pub enum AclPermission {
    /// Permit the action.
    #[default]
    Allow,
    /// Refuse the action.
    Deny,
}

/// One ACL rule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("size(self.topics) > 0").message("acl.rules[].topics must not be empty"))]
pub struct AclRule {
    /// allow or deny when the rule matches.
    pub permission: AclPermission,
    /// Which clients the rule applies to.
    pub who: AclWho,
    /// publish, subscribe or all.
    #[serde(default)]
    pub action: AclAction,
    /// Topic filters (%c = client id, %u = username).
    pub topics: Vec<String>,
}

/// Selects the clients a rule applies to; exactly one field is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.user) ? 1 : 0) + (has(self.clientId) ? 1 : 0) + (has(self.ipCidr) ? 1 : 0) + ((has(self.all) && self.all) ? 1 : 0) == 1")
    .message("acl.rules[].who must set exactly one of user, clientId, ipCidr, all"))]
pub struct AclWho {
    /// A username.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A client id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// A source address range (CIDR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_cidr: Option<String>,
    /// Every client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<bool>,
}

/// Which operation a rule covers.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[serde(rename_all = "snake_case")]
pub enum AclAction {
    /// Publishing.
    Publish,
    /// Subscribing.
    Subscribe,
    /// Both.
    #[default]
    All,
}
