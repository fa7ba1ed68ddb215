//! Who may do what, over real sockets: authentication (users file, HTTP backend), the ACL,
//! limits, the operator-facing features (webhooks, bridges' and the event store's status,
//! evacuation), the admin API's security, and the event store in PostgreSQL and Redis. One
//! test binary, each concern a module, so the broker is linked once for all of them.

#[path = "../access_support/mod.rs"]
mod access_support;
#[path = "../common/mod.rs"]
mod common;
#[path = "../typed_api/mod.rs"]
mod typed_api;

mod acl;
mod admin_security;
mod auth;
mod eventstore;
mod limits;
mod ops;
