//! Reads admin API answers strictly into their `corvid-api` types: the answer must
//! deserialize, and serializing the typed value again must give back exactly the broker's JSON.
//! So a field the broker adds, drops or renames without the type following — or a state string
//! the enum does not know (it would come back as `"unknown"`) — fails the test that reads it.
#![allow(dead_code)]

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// `answer` (what `what` returned) as a `T`, failing unless `T` carries every field and value.
pub fn strict<T: DeserializeOwned + Serialize>(what: &str, answer: &Value) -> T {
    let typed: T = serde_json::from_value(answer.clone()).unwrap_or_else(|e| {
        panic!(
            "{what}: the answer does not read as {}: {e}\n{answer:#}",
            std::any::type_name::<T>()
        )
    });
    let again = serde_json::to_value(&typed).expect("a typed answer serializes");
    assert_eq!(
        &again,
        answer,
        "{what}: {} does not carry the answer exactly (left: typed and written again, right: \
         the broker's)",
        std::any::type_name::<T>()
    );
    typed
}

/// `body` as JSON, failing the test with `what` when it is not.
pub fn json(what: &str, body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"))
}
